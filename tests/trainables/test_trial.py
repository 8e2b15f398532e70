"""One trial end to end: stage order, record keys, exact resume, checkpoint cadence, atomic and
code-free checkpoints."""

import functools
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from deploy.artefacts import model_from_checkpoint
from tests.conftest import tiny_config
from trainables.checkpoint import append_jsonl, load_checkpoint, read_jsonl, save_checkpoint
from trainables.config import RuntimeConfig, TrialConfig, merge
from trainables.cost import gmacs
from trainables.errors import UserError
from trainables.models import build_model
from trainables.trial import run_trial

RECORD_KEYS = {
    "stage",
    "epoch",
    "global_epoch",
    "lr",
    "train_loss",
    "val_loss",
    "val_miou",
    "val_miou_corrosion",
    "val_iou",
    "target_sparsity",
    "achieved_sparsity",
    "overall_sparsity",
    "nonzero_params",
    "total_params",
    "mask_updated",
    "time_s",
}


# The conftest's tiny trial made quicker for this file's many runs: 32 px, one training step an
# epoch, LinkNet (the lightest of the five architectures; nothing here depends on which) and no
# latency runs (the one test about the recorded latency asks for them).
QUICK = {
    "data": {"crop_size": 32, "synthetic": {"train": 6, "test": 2, "size": 32}},
    "model": {"arch": "linknet"},
    "runtime": {"latency_repeats": 0},
}


def _tiny(**sections: dict) -> dict:
    return tiny_config(**merge(QUICK, sections))


class Crash(Exception):
    pass


def _crash_after(n: int):
    seen = []

    def reporter(record: dict) -> None:
        seen.append(record)
        if len(seen) == n:
            raise Crash

    return reporter


# The trials shared by several tests (module fixtures) run on their first call, inside a test:
# so with the torch threads the conftest pins for every test, not with whatever count the process
# had when module fixtures are set up (before that pin); another count gives other numbers, and
# the tests compare resumed runs with these to 1e-5.


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """`pruned_run()`: an AGP trial run without interruption (config, folder, result)."""
    cfg = TrialConfig.from_dict(_tiny(pruning={"pruner": "agp", "sparsity": 0.5}))
    out = tmp_path_factory.mktemp("agp")

    @functools.cache
    def run() -> tuple[TrialConfig, Path, dict]:
        return cfg, out, run_trial(cfg, out)

    return run


def test_stages_run_in_order_with_full_records(pruned_run) -> None:
    cfg, out, result = pruned_run()
    records = read_jsonl(out / "metrics.jsonl")
    assert [(r["stage"], r["epoch"]) for r in records] == [
        ("train", 1),
        ("train", 2),
        ("prune", 1),
        ("prune", 2),
        ("finetune", 1),
    ]
    assert [r["global_epoch"] for r in records] == [1, 2, 3, 4, 5]
    for r in records:
        assert set(r) >= RECORD_KEYS, RECORD_KEYS - set(r)
        assert len(r["val_iou"]) == 4
    assert records[1]["achieved_sparsity"] == 0
    assert records[-1]["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert result["dense"]["test_miou"] >= 0 and result["pruned"]["test_miou"] >= 0
    assert json.loads((out / "final.json").read_text()) == result
    for name in (
        "config.yaml",
        "env.json",
        "examples.npz",
        "checkpoints/dense.pt",
        "checkpoints/final.pt",
    ):
        assert (out / name).exists(), name
    assert not (out / "checkpoints" / "last.pt").exists()  # finished: nothing left to resume
    env = json.loads((out / "env.json").read_text())
    assert env["seed"] == 0 and env["versions"]["torch"] == torch.__version__.split("+")[0]
    assert env["versions"]["segmentation-models-pytorch"]


@pytest.fixture(scope="module")
def crashed_run(pruned_run, tmp_path_factory):
    """`crashed_run()`: the folder of pruned_run's trial dying after its third epoch (in the
    prune stage), to copy and resume."""
    out = tmp_path_factory.mktemp("crashed")

    @functools.cache
    def run() -> Path:
        cfg, _, _ = pruned_run()
        with pytest.raises(Crash):
            run_trial(cfg, out, reporter=_crash_after(3))
        return out

    return run


def test_final_checkpoint_loads_back_with_its_zeros(pruned_run) -> None:
    _, out, result = pruned_run()
    model, cfg = model_from_checkpoint(out / "checkpoints" / "final.pt")
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert zeros >= result["total_params"] - result["nonzero_params"]
    assert cfg.pruning.pruner == "agp"


def test_resumed_run_continues_exactly(pruned_run, crashed_run, tmp_path) -> None:
    cfg, straight_out, straight = pruned_run()  # the same trial, run without interruption
    crashed = shutil.copytree(crashed_run(), tmp_path / "crashed")
    assert not (crashed / "final.json").exists()
    resumed_records = []
    resumed = run_trial(cfg, crashed, reporter=resumed_records.append)
    # last.pt was written at the train stage's end (the tiny run is far inside the time cadence)
    assert [r["global_epoch"] for r in resumed_records[:-1]] == [3, 4, 5]
    a = read_jsonl(straight_out / "metrics.jsonl")
    b = read_jsonl(crashed / "metrics.jsonl")
    assert [r["global_epoch"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b, strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
        assert ra["val_miou"] == pytest.approx(rb["val_miou"], rel=1e-5)
    assert resumed["pruned"]["test_miou"] == pytest.approx(
        straight["pruned"]["test_miou"], rel=1e-5
    )


def test_warm_start_skips_training_stage(pruned_run, tmp_path) -> None:
    cfg, out, result = pruned_run()
    mp = cfg.replace(pruning={"pruner": "mp", "sparsity": 0.5})
    warm = run_trial(mp, tmp_path / "mp", warm_start=out / "checkpoints" / "dense.pt")
    stages = [r["stage"] for r in read_jsonl(tmp_path / "mp" / "metrics.jsonl")]
    assert stages == ["prune", "prune", "finetune"]
    assert warm["dense"] == result["dense"]


def test_warm_started_and_resumed_trials_need_no_encoder_weights(
    pruned_run, crashed_run, tmp_path
) -> None:
    """A stage-2 trial (or a resumed one) takes every weight from its checkpoint: the encoder
    weights named in its config (here a file this node does not have) are never fetched."""
    cfg, out, result = pruned_run()
    absent_file = tmp_path / "not-on-this-node.pt"
    absent = cfg.replace(model={"encoder_weights": str(absent_file)})
    with pytest.raises(UserError, match="not-on-this-node.pt"):  # a dense trial does need them
        run_trial(absent, tmp_path / "dense")
    warm = run_trial(absent, tmp_path / "pruned", warm_start=out / "checkpoints" / "dense.pt")
    assert warm["dense"] == result["dense"]
    # The crashed run resumed on a node without the file: its config names it, its last.pt exists.
    config = shutil.copytree(crashed_run(), tmp_path / "resumed") / "config.yaml"
    named = config.read_text().replace("encoder_weights: null", f"encoder_weights: {absent_file}")
    assert named != config.read_text()
    config.write_text(named)
    resumed = run_trial(absent, tmp_path / "resumed")
    assert resumed["pruned"]["test_miou"] == pytest.approx(result["pruned"]["test_miou"], rel=1e-5)


def test_finished_trial_is_not_rerun(pruned_run) -> None:
    cfg, out, result = pruned_run()
    before = (out / "metrics.jsonl").read_text()
    assert run_trial(cfg, out) == result
    assert (out / "metrics.jsonl").read_text() == before
    assert not (out / "checkpoints" / "last.pt").exists()


def test_other_config_in_same_folder_is_refused(tmp_path) -> None:
    cfg = TrialConfig.from_dict(_tiny(stages={"train_epochs": 1}))
    with pytest.raises(Crash):
        run_trial(cfg, tmp_path, reporter=_crash_after(1))
    with pytest.raises(UserError, match="different configuration"):
        run_trial(cfg.replace(seed=5), tmp_path)


def test_run_from_an_older_version_resumes(tmp_path) -> None:
    """A config.yaml without keys added since (here runtime.augment and the checkpoint cadence)
    means their defaults."""
    import yaml

    cfg = TrialConfig.from_dict(_tiny(stages={"train_epochs": 2}))
    with pytest.raises(Crash):
        run_trial(cfg, tmp_path, reporter=_crash_after(1))
    older = cfg.to_dict()
    for key in ("augment", "checkpoint_every_epochs", "checkpoint_every_s"):
        del older["runtime"][key]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    assert run_trial(cfg, tmp_path)["dense"]["test_miou"] >= 0
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2
    older["runtime"]["retired_switch"] = True
    (tmp_path / "final.json").unlink()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    with pytest.raises(UserError, match="different configuration"):
        run_trial(cfg, tmp_path)


def _cadence(epochs: int | None, seconds: float | None, **sections: dict) -> TrialConfig:
    """A quick tiny trial with the given last.pt cadence."""
    cadence = {"runtime": {"checkpoint_every_epochs": epochs, "checkpoint_every_s": seconds}}
    return TrialConfig.from_dict(_tiny(**merge(cadence, sections)))


def _spy_last_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The global epoch of every last.pt written from now on."""
    writes = []

    def spy(state: dict, path: Path) -> None:
        if path.name == "last.pt":
            writes.append(state["global_epoch"])
        save_checkpoint(state, path)

    monkeypatch.setattr("trainables.trial.save_checkpoint", spy)
    return writes


def _records_and_last(out: Path) -> tuple[list[int], int]:
    """Global epochs in metrics.jsonl, and the one last.pt was written after."""
    epochs = [r["global_epoch"] for r in read_jsonl(out / "metrics.jsonl")]
    return epochs, load_checkpoint(out / "checkpoints" / "last.pt")["global_epoch"]


def _without_times(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_jsonl(path)]


@pytest.fixture(scope="module")
def every_2(tmp_path_factory):
    """`every_2()`: an AGP trial (train 3, prune 2, fine-tune 1 epochs) writing last.pt every 2
    epochs, run without interruption; and the global epochs at which it wrote last.pt."""
    cfg = _cadence(2, None, pruning={"pruner": "agp", "sparsity": 0.5}, stages={"train_epochs": 3})
    out = tmp_path_factory.mktemp("every2")

    @functools.cache
    def run() -> tuple[TrialConfig, Path, dict, list[int]]:
        with pytest.MonkeyPatch.context() as mp:
            writes = _spy_last_writes(mp)
            result = run_trial(cfg, out)
        return cfg, out, result, writes

    return run


def test_last_checkpoint_is_written_on_its_cadence_and_at_stage_ends(every_2) -> None:
    _, out, _, writes = every_2()
    assert writes == [2, 3, 5, 6]  # train 2 and its end 3; prune 2 (its end); fine-tune 1
    assert (out / "checkpoints" / "final.pt").exists()
    assert not (out / "checkpoints" / "last.pt").exists()


def test_time_cadence_of_zero_writes_after_every_epoch(tmp_path, monkeypatch) -> None:
    writes = _spy_last_writes(monkeypatch)
    run_trial(_cadence(None, 0.0, stages={"train_epochs": 3}), tmp_path)
    assert writes == [1, 2, 3]


def test_checkpoint_due_by_epochs_time_or_stage_end() -> None:
    default = RuntimeConfig()
    assert default.checkpoint_every_epochs is None and default.checkpoint_every_s == 600.0
    assert not default.checkpoint_due(3, 10, 599.0)
    assert default.checkpoint_due(3, 10, 600.0) and default.checkpoint_due(10, 10, 0.0)
    every_4 = RuntimeConfig(checkpoint_every_epochs=4, checkpoint_every_s=None)
    assert [e for e in range(1, 11) if every_4.checkpoint_due(e, 10, 1e9)] == [4, 8, 10]


@pytest.mark.parametrize(
    ("key", "value"), [("checkpoint_every_epochs", 0), ("checkpoint_every_s", -1.5)]
)
def test_checkpoint_cadence_rejects_bad_values(key: str, value: float) -> None:
    with pytest.raises(UserError, match=f"'runtime.{key}' is {value}; expected"):
        TrialConfig.from_dict(tiny_config(runtime={key: value}))


def test_crashes_between_checkpoints_resume_to_the_same_records(
    every_2, tmp_path, monkeypatch
) -> None:
    """Three crashes in one folder, each resumed from the last written last.pt: the records
    end up those of the uninterrupted run, none twice, none lost."""
    cfg, straight_out, straight, _ = every_2()

    def append_but_3(path: Path, record: dict) -> None:
        if record["global_epoch"] == 3:
            raise Crash  # dies writing the record of an epoch whose checkpoint is due
        append_jsonl(path, record)

    with monkeypatch.context() as mp, pytest.raises(Crash):
        mp.setattr("trainables.trial.append_jsonl", append_but_3)
        run_trial(cfg, tmp_path)
    assert _records_and_last(tmp_path) == ([1, 2], 2)  # epoch 3 re-runs, its record kept
    with pytest.raises(Crash):
        run_trial(cfg, tmp_path, reporter=_crash_after(2))  # epochs 3, 4 (prune 1, no write)
    assert _records_and_last(tmp_path) == ([1, 2, 3, 4], 3)
    with pytest.raises(Crash):
        run_trial(cfg, tmp_path, reporter=_crash_after(3))  # 4 again, 5, 6: dies after the last
    assert _records_and_last(tmp_path) == ([1, 2, 3, 4, 5, 6], 6)
    rerun = []
    resumed = run_trial(cfg, tmp_path, reporter=rerun.append)
    assert [r for r in rerun if "global_epoch" in r] == []  # only the final evaluation was left
    assert _without_times(tmp_path / "metrics.jsonl") == _without_times(
        straight_out / "metrics.jsonl"
    )
    assert resumed["pruned"] == straight["pruned"]
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
    assert run_trial(cfg, tmp_path) == resumed  # finished: its stored result, nothing re-run


def test_checkpoint_write_is_atomic_and_refuses_pickled_code(tmp_path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            return (print, ("code ran",))

    with pytest.raises((pickle.PicklingError, AttributeError)):
        save_checkpoint({"a": torch.ones(2), "bad": lambda: 0}, path)  # fails mid-write
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))  # the good file survived
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind
    evil = tmp_path / "evil.pt"
    torch.save({"x": Boom()}, evil, _use_new_zipfile_serialization=True)
    with pytest.raises(UserError, match="evil.pt"):
        load_checkpoint(evil)


def test_channel_pruned_trial_records_a_slim_deployable_model(tmp_path) -> None:
    config = _tiny(
        model={"arch": "unet"},
        pruning={"pruner": "agp", "sparsity": 0.5, "granularity": "channel"},
        runtime={"latency_repeats": RuntimeConfig().latency_repeats},
    )
    cfg = TrialConfig.from_dict(config)
    result = run_trial(cfg, tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["achieved_sparsity"] for r in records if r["stage"] == "finetune"] == [0.5]
    inference = result["inference"]
    assert inference["size"] == [32, 32] and inference["latency_ms"] > 0
    assert inference["params"] == result["nonzero_params"] < 0.7 * result["total_params"]
    assert inference["compact_fp16_mib"] < inference["compact_mib"] < inference["dense_fp32_mib"]
    slim, _ = model_from_checkpoint(tmp_path / "checkpoints" / "final.pt")
    assert sum(p.numel() for p in slim.parameters()) == inference["params"]


def test_coupled_pruned_trial_records_a_slim_deployable_model(tmp_path) -> None:
    """Coupled pruning masks through the prune stage and fine-tuning; the deployable model is cut
    slim from final.pt (coupled channels gone together) and is what the trial's cost describes."""
    config = _tiny(
        model={"arch": "unet"},
        pruning={"pruner": "agp", "sparsity": 0.5, "granularity": "coupled"},
    )
    cfg = TrialConfig.from_dict(config)
    result = run_trial(cfg, tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert {r["stage"] for r in records} >= {"prune", "finetune"}
    inference = result["inference"]
    slim, _ = model_from_checkpoint(tmp_path / "checkpoints" / "final.pt")
    assert sum(p.numel() for p in slim.parameters()) == inference["params"]
    assert inference["params"] < 0.7 * result["total_params"]
    dense = build_model(cfg.model, cfg.data.classes).eval()
    x = torch.randn(1, 3, *inference["size"])
    assert inference["gmacs"] < 0.8 * gmacs(dense, x)  # coupled channels cut: real work saved


def test_channel_granularity_rejects_global_scope() -> None:
    config = tiny_config(pruning={"pruner": "agp", "sparsity": 0.5, "granularity": "channel"})
    config["pruning"]["scope"] = "global"
    with pytest.raises(UserError, match="pruning.scope"):
        TrialConfig.from_dict(config)


def test_compile_switch_compiles_the_training_forward_only(tmp_path, monkeypatch) -> None:
    """runtime.compile wraps the model for training steps (one crop size); evaluation and the
    checkpoints use the plain model, which shares the parameters."""
    compiled = []

    def fake_compile(model, mode):
        compiled.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    config = _tiny(stages={"train_epochs": 1, "prune_epochs": 0, "finetune_epochs": 0})
    config["runtime"]["compile"] = "reduce-overhead"
    run_trial(TrialConfig.from_dict(config), tmp_path / "on")
    assert compiled == ["reduce-overhead"]
    config["runtime"]["compile"] = "auto"  # on a CPU: off
    run_trial(TrialConfig.from_dict(config), tmp_path / "auto")
    assert compiled == ["reduce-overhead"]


def test_device_augmentation_trains_and_resumes_exactly(tmp_path) -> None:
    """runtime.augment=device: uint8 batches warped in the step; a crashed run resumes to the
    same numbers, and the records differ from loader-side augmentation (other draws)."""
    config = _tiny(
        stages={"train_epochs": 3, "prune_epochs": 0, "finetune_epochs": 0},
        model={"arch": "fpn"},  # its test mIoU moves more with the draws than LinkNet's
        runtime={"augment": "device", "checkpoint_every_epochs": 2},
    )
    cfg = TrialConfig.from_dict(config)
    straight = run_trial(cfg, tmp_path / "straight")
    with pytest.raises(Crash):
        run_trial(cfg, tmp_path / "crashed", reporter=_crash_after(2))
    resumed = []
    run_trial(cfg, tmp_path / "crashed", reporter=resumed.append)
    assert [r["global_epoch"] for r in resumed if "global_epoch" in r] == [3]  # from last.pt
    a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "crashed" / "metrics.jsonl")
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], rel=1e-5)
    config["runtime"]["augment"] = "auto"  # on a CPU: in the loader; env.json says so
    cpu = run_trial(TrialConfig.from_dict(config), tmp_path / "cpu")
    env = json.loads((tmp_path / "cpu" / "env.json").read_text())
    assert env["runtime"]["augment"] == "cpu" and env["runtime"]["compile"] == "off"
    assert cpu["dense"]["test_miou"] != straight["dense"]["test_miou"]
