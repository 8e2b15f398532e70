"""Config: unknown keys and bad values are rejected with the key and allowed values named."""

import pytest

from sweep.config import load_preset, parse_set, trial_config
from trainables.config import TrialConfig
from trainables.errors import UserError


def test_defaults_are_the_papers_optimiser() -> None:
    cfg = TrialConfig()
    assert (cfg.optim.batch_size, cfg.optim.momentum) == (4, 0.5)
    assert (cfg.optim.base_lr, cfg.optim.max_lr, cfg.optim.half_cycle_iters) == (1e-4, 1e-2, 2000)
    assert (cfg.stages.train_epochs, cfg.stages.prune_epochs, cfg.stages.finetune_epochs) == (
        100,
        50,
        100,
    )


def test_unknown_key_is_named_with_allowed_keys() -> None:
    with pytest.raises(UserError, match=r"optim\.max_lrr.*allowed keys here: .*max_lr"):
        TrialConfig.from_dict({"optim": {"max_lrr": 0.1}})


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        ({"model": {"arch": "deeplab"}}, r"model\.arch.*allowed values: unet, unetplusplus"),
        ({"pruning": {"pruner": "agp", "sparsity": 1.5}}, r"pruning\.sparsity"),
        ({"optim": {"batch_size": "four"}}, r"optim\.batch_size.*number"),
        ({"data": {"crop_size": 100}}, r"data\.crop_size.*multiple of 32"),
        (
            {"data": {"dataset": "sscs", "num_classes": 3}},
            r"data\.num_classes.*4 for dataset 'sscs'",
        ),
        ({"data": {"dataset": "folder"}}, r"data\.num_classes.*required for dataset 'folder'"),
        (
            {"pruning": {"pruner": "lp", "sparsity": 0.5, "steps": 3}},
            r"stages\.prune_epochs.*multiple of pruning\.steps=3",
        ),
        ({"loss": {"class_weights": [1, 2]}, "data": {"dataset": "nea"}}, r"3 weights"),
        ({"data": {"synthetic": {"train": 0}}}, r"data\.synthetic\.train.*at least 2"),
    ],
)
def test_invalid_values_are_rejected(config: dict, pattern: str) -> None:
    with pytest.raises(UserError, match=pattern):
        TrialConfig.from_dict(config)


def test_round_trip_and_replace() -> None:
    cfg = TrialConfig.from_dict({"pruning": {"pruner": "agp", "sparsity": 0.9}})
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg
    half = cfg.replace(pruning={"sparsity": 0.5})
    assert half.pruning.sparsity == 0.5 and half.pruning.pruner == "agp"


def test_classes_resolve_from_dataset() -> None:
    assert TrialConfig.from_dict({"data": {"dataset": "nea"}}).data.classes == 3
    assert TrialConfig.from_dict({"data": {"dataset": "sscs"}}).data.classes == 4
    synth = {"dataset": "synthetic", "synthetic": {"classes": 3}}
    assert TrialConfig.from_dict({"data": synth}).data.classes == 3


def test_presets_load_and_paper_preset_states_the_paper() -> None:
    paper = trial_config(load_preset("paper"))
    assert paper.model.encoder == "resnet101" and paper.model.encoder_weights == "imagenet"
    assert paper.data.crop_size == 512 and paper.optim.batch_size == 4
    assert paper.pruning.steps == 5 and paper.stages.prune_epochs == 50
    demo = trial_config(load_preset("demo"))
    assert demo.data.dataset == "synthetic" and demo.model.encoder_weights is None


def test_unknown_preset_lists_shipped_ones() -> None:
    with pytest.raises(
        UserError, match="shipped presets: budget-search, demo, finetune-hpo, paper"
    ):
        load_preset("nope")


def test_set_flags_parse_to_nested_overrides() -> None:
    assert parse_set(["optim.max_lr=0.02", "seed=3"]) == {"optim": {"max_lr": 0.02}, "seed": 3}
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_set(["optim.max_lr"])


def test_runtime_auto_switches_resolve_per_device() -> None:
    """ "auto" is the measured fastest choice per device: bf16, channels-last and CUDA graphs on
    a GPU, all off on a CPU; explicit values win."""
    runtime = TrialConfig.from_dict({"runtime": {"amp": "auto"}}).runtime
    assert (runtime.amp, runtime.channels_last, runtime.compile) == (None, None, "auto")
    gpu, cpu = runtime.resolve("cuda"), runtime.resolve("cpu")
    assert (gpu.amp, gpu.channels_last, gpu.compile) == (True, True, "reduce-overhead")
    assert (cpu.amp, cpu.channels_last, cpu.compile) == (False, False, "off")
    fixed = TrialConfig.from_dict({"runtime": {"amp": "false", "compile": "default"}}).runtime
    assert (fixed.resolve("cuda").amp, fixed.resolve("cuda").compile) == (False, "default")
    with pytest.raises(UserError, match="runtime.compile"):
        TrialConfig.from_dict({"runtime": {"compile": "fast"}})
    assert (gpu.augment, cpu.augment) == ("device", "cpu")
    fixed = TrialConfig.from_dict({"runtime": {"augment": "device"}}).runtime
    assert fixed.resolve("cpu").augment == "device"
    with pytest.raises(UserError, match="runtime.augment.*auto, cpu, device"):
        TrialConfig.from_dict({"runtime": {"augment": "gpu"}})


def test_slim_finetune_is_auto_for_what_can_be_cut_and_refused_for_element() -> None:
    """auto (the default): slim for channel and coupled, masked for element; true with element
    pruning names the key and what is allowed; a dense trial ignores it."""
    pruned = {"pruner": "agp", "sparsity": 0.5}
    for granularity, slim in (("element", False), ("channel", True), ("coupled", True)):
        pruning = TrialConfig.from_dict({"pruning": {**pruned, "granularity": granularity}}).pruning
        assert pruning.slim_finetune is None and pruning.finetunes_slim is slim
    off = {**pruned, "granularity": "coupled", "slim_finetune": "false"}
    assert not TrialConfig.from_dict({"pruning": off}).pruning.finetunes_slim
    auto = TrialConfig.from_dict({"pruning": {**off, "slim_finetune": "auto"}})
    assert auto.pruning.slim_finetune is None and TrialConfig.from_dict(auto.to_dict()) == auto
    with pytest.raises(UserError, match=r"'pruning.slim_finetune' is True; expected false or auto"):
        TrialConfig.from_dict({"pruning": {**pruned, "slim_finetune": True}})
    with pytest.raises(UserError, match=r"pruning.slim_finetune.*true or false"):
        TrialConfig.from_dict({"pruning": {**pruned, "slim_finetune": "maybe"}})
    TrialConfig.from_dict({"pruning": {"slim_finetune": True}})  # dense: nothing to fine-tune
