"""One trial end to end: stage order, record keys, exact resume, atomic and code-free checkpoints."""

import json
import pickle

import pytest
import torch

from tests.conftest import tiny_config
from trainables.checkpoint import load_checkpoint, read_jsonl, save_checkpoint
from trainables.config import TrialConfig
from trainables.errors import UserError
from trainables.trial import model_from_checkpoint, run_trial

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


class Crash(Exception):
    pass


def _crash_after(n: int):
    seen = []

    def reporter(record: dict) -> None:
        seen.append(record)
        if len(seen) == n:
            raise Crash

    return reporter


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    cfg = TrialConfig.from_dict(tiny_config(pruning={"pruner": "agp", "sparsity": 0.5}))
    out = tmp_path_factory.mktemp("agp")
    return cfg, out, run_trial(cfg, out)


def test_stages_run_in_order_with_full_records(pruned_run) -> None:
    cfg, out, result = pruned_run
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
        "checkpoints/last.pt",
    ):
        assert (out / name).exists(), name
    env = json.loads((out / "env.json").read_text())
    assert env["seed"] == 0 and env["versions"]["torch"] == torch.__version__.split("+")[0]
    assert env["versions"]["segmentation-models-pytorch"]


def test_final_checkpoint_loads_back_with_its_zeros(pruned_run) -> None:
    _, out, result = pruned_run
    model, cfg = model_from_checkpoint(out / "checkpoints" / "final.pt")
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert zeros >= result["total_params"] - result["nonzero_params"]
    assert cfg.pruning.pruner == "agp"


def test_resumed_run_continues_exactly(tmp_path) -> None:
    cfg = TrialConfig.from_dict(tiny_config(pruning={"pruner": "lp", "sparsity": 0.5}))
    straight = run_trial(cfg, tmp_path / "straight")
    with pytest.raises(Crash):
        run_trial(cfg, tmp_path / "crashed", reporter=_crash_after(3))  # dies in the prune stage
    assert not (tmp_path / "crashed" / "final.json").exists()
    resumed_records = []
    resumed = run_trial(cfg, tmp_path / "crashed", reporter=resumed_records.append)
    assert [r["global_epoch"] for r in resumed_records[:-1]] == [4, 5]
    a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "crashed" / "metrics.jsonl")
    assert [r["global_epoch"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b, strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
        assert ra["val_miou"] == pytest.approx(rb["val_miou"], rel=1e-5)
    assert resumed["pruned"]["test_miou"] == pytest.approx(
        straight["pruned"]["test_miou"], rel=1e-5
    )


def test_warm_start_skips_training_stage(pruned_run, tmp_path) -> None:
    cfg, out, result = pruned_run
    mp = cfg.replace(pruning={"pruner": "mp", "sparsity": 0.5})
    warm = run_trial(mp, tmp_path / "mp", warm_start=out / "checkpoints" / "dense.pt")
    stages = [r["stage"] for r in read_jsonl(tmp_path / "mp" / "metrics.jsonl")]
    assert stages == ["prune", "prune", "finetune"]
    assert warm["dense"] == result["dense"]


def test_finished_trial_is_not_rerun(pruned_run) -> None:
    cfg, out, result = pruned_run
    before = (out / "metrics.jsonl").read_text()
    assert run_trial(cfg, out) == result
    assert (out / "metrics.jsonl").read_text() == before


def test_other_config_in_same_folder_is_refused(tmp_path) -> None:
    cfg = TrialConfig.from_dict(tiny_config(stages={"train_epochs": 1}))
    with pytest.raises(Crash):
        run_trial(cfg, tmp_path, reporter=_crash_after(1))
    with pytest.raises(UserError, match="different configuration"):
        run_trial(cfg.replace(seed=5), tmp_path)


def test_run_from_an_older_version_resumes(tmp_path) -> None:
    """A config.yaml without keys added since (here runtime.augment) means their defaults."""
    import yaml

    cfg = TrialConfig.from_dict(tiny_config(stages={"train_epochs": 2}))
    with pytest.raises(Crash):
        run_trial(cfg, tmp_path, reporter=_crash_after(1))
    older = cfg.to_dict()
    del older["runtime"]["augment"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    assert run_trial(cfg, tmp_path)["dense"]["test_miou"] >= 0
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2
    older["runtime"]["retired_switch"] = True
    (tmp_path / "final.json").unlink()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    with pytest.raises(UserError, match="different configuration"):
        run_trial(cfg, tmp_path)


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
    config = tiny_config(
        model={"arch": "unet"}, pruning={"pruner": "agp", "sparsity": 0.5, "granularity": "channel"}
    )
    cfg = TrialConfig.from_dict(config)
    result = run_trial(cfg, tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["achieved_sparsity"] for r in records if r["stage"] == "finetune"] == [0.5]
    inference = result["inference"]
    assert inference["size"] == [64, 64] and inference["latency_ms"] > 0
    assert inference["params"] == result["nonzero_params"] < 0.7 * result["total_params"]
    assert inference["compact_fp16_mib"] < inference["compact_mib"] < inference["dense_fp32_mib"]
    slim, _ = model_from_checkpoint(tmp_path / "checkpoints" / "final.pt")
    assert sum(p.numel() for p in slim.parameters()) == inference["params"]


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
    config = tiny_config(stages={"train_epochs": 1, "prune_epochs": 0, "finetune_epochs": 0})
    config["runtime"]["compile"] = "reduce-overhead"
    run_trial(TrialConfig.from_dict(config), tmp_path / "on")
    assert compiled == ["reduce-overhead"]
    config["runtime"]["compile"] = "auto"  # on a CPU: off
    run_trial(TrialConfig.from_dict(config), tmp_path / "auto")
    assert compiled == ["reduce-overhead"]


def test_device_augmentation_trains_and_resumes_exactly(tmp_path) -> None:
    """runtime.augment=device: uint8 batches warped in the step; a crashed run resumes to the
    same numbers, and the records differ from loader-side augmentation (other draws)."""
    config = tiny_config(stages={"train_epochs": 3, "prune_epochs": 0, "finetune_epochs": 0})
    config["runtime"]["augment"] = "device"
    cfg = TrialConfig.from_dict(config)
    straight = run_trial(cfg, tmp_path / "straight")
    with pytest.raises(Crash):
        run_trial(cfg, tmp_path / "crashed", reporter=_crash_after(2))
    run_trial(cfg, tmp_path / "crashed")
    a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "crashed" / "metrics.jsonl")
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], rel=1e-5)
    config["runtime"]["augment"] = "auto"  # on a CPU: in the loader; env.json says so
    cpu = run_trial(TrialConfig.from_dict(config), tmp_path / "cpu")
    env = json.loads((tmp_path / "cpu" / "env.json").read_text())
    assert env["runtime"]["augment"] == "cpu" and env["runtime"]["compile"] == "off"
    assert cpu["dense"]["test_miou"] != straight["dense"]["test_miou"]
