"""Slim fine-tuning: a structured-pruned model is cut when fine-tuning starts, computes what the
masked model computes, resumes exactly from a slim last.pt, and its slim final.pt and last.pt
load wherever checkpoints are loaded (deploy, the fine-tuning search's warm start)."""

import functools
from pathlib import Path

import pytest
import torch

from deploy.artefacts import model_from_checkpoint
from tests.trainables.test_trial import Crash, _crash_after, _tiny, _without_times
from trainables.checkpoint import load_checkpoint, read_jsonl
from trainables.config import TrialConfig
from trainables.engine import build_optimizer
from trainables.errors import UserError
from trainables.trial import Position, Trial, run_trial

# Coupled pruning of the quick LinkNet: train 1, prune 2 (masks at the target after its second
# epoch), fine-tune 2 epochs, last.pt after every epoch (as the fine-tuning search writes it).
SLIM = {
    "pruning": {"pruner": "agp", "sparsity": 0.5, "granularity": "coupled"},
    "stages": {"train_epochs": 1, "finetune_epochs": 2},
    "runtime": {"checkpoint_every_epochs": 1},
}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`runs(slim)`: the coupled trial fine-tuned slim (auto) or masked, run without
    interruption (config, folder, result)."""
    root = tmp_path_factory.mktemp("slim")

    @functools.cache
    def run(slim: bool) -> tuple[TrialConfig, Path, dict]:
        cfg = TrialConfig.from_dict(_tiny(**SLIM))
        if not slim:
            cfg = cfg.replace(pruning={"slim_finetune": False})
        out = root / ("slim" if slim else "masked")
        return cfg, out, run_trial(cfg, out)

    return run


def test_slim_finetuning_computes_what_masked_finetuning_computes(runs) -> None:
    """Pruned channels carry exact zeros, so the slim model's steps are the masked model's up to
    float rounding; the records keep counting against the full-size model."""
    _, slim_out, slim = runs(True)
    _, masked_out, masked = runs(False)
    a, b = read_jsonl(masked_out / "metrics.jsonl"), read_jsonl(slim_out / "metrics.jsonl")
    assert [r["stage"] for r in b] == ["train", "prune", "prune", "finetune", "finetune"]
    for ra, rb in zip(a, b, strict=True):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
        assert rb["val_miou"] == pytest.approx(ra["val_miou"], abs=1e-3)
        for key in ("achieved_sparsity", "total_params", "target_sparsity"):
            assert rb[key] == ra[key], key
        assert rb["nonzero_params"] == ra["nonzero_params"]
    assert b[-1]["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert slim["pruned"]["test_miou"] == pytest.approx(masked["pruned"]["test_miou"], abs=1e-3)
    for key in ("params", "gmacs", "dense_fp32_mib"):
        assert slim["inference"][key] == masked["inference"][key], key
    slim_state = load_checkpoint(slim_out / "checkpoints" / "final.pt")
    masked_state = load_checkpoint(masked_out / "checkpoints" / "final.pt")
    assert "masks" in masked_state and masked_state.get("slim") is None
    assert "masks" not in slim_state and slim_state["slim"]["total_params"] == slim["total_params"]
    held = sum(t.numel() for t in slim_state["model"].values())
    assert held < 0.7 * sum(t.numel() for t in masked_state["model"].values())  # stored slim


def test_slim_final_checkpoint_loads_as_the_deployable_model(runs) -> None:
    cfg, out, result = runs(True)
    model, loaded_cfg = model_from_checkpoint(out / "checkpoints" / "final.pt")
    assert loaded_cfg.pruning == cfg.pruning
    assert _params(model) == result["inference"]["params"] < 0.7 * result["total_params"]
    state = load_checkpoint(out / "checkpoints" / "final.pt")["model"]
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())


def test_resume_inside_slim_finetuning_is_exact(runs, tmp_path) -> None:
    """Crashed after the first fine-tuning epoch, the trial rebuilds the slim architecture from
    last.pt and ends with the uninterrupted run's records and weights, bit for bit."""
    cfg, straight_out, straight = runs(True)
    with pytest.raises(Crash):
        run_trial(cfg, tmp_path, reporter=_crash_after(4))  # train, prune 1, 2, fine-tune 1
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["global_epoch"] == 4 and last["pruner"] is None
    assert (
        last["slim"]["structure"]
        and sum(t.numel() for t in last["model"].values()) < 0.7 * (straight["total_params"])
    )
    rerun = []
    resumed = run_trial(cfg, tmp_path, reporter=rerun.append)
    assert [r["global_epoch"] for r in rerun if "global_epoch" in r] == [5]
    assert _without_times(tmp_path / "metrics.jsonl") == _without_times(
        straight_out / "metrics.jsonl"
    )
    assert resumed["pruned"] == straight["pruned"]
    a = load_checkpoint(straight_out / "checkpoints" / "final.pt")["model"]
    b = load_checkpoint(tmp_path / "checkpoints" / "final.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetuning_search_starts_from_a_slim_final_checkpoint(runs, tmp_path) -> None:
    """The search (sweep/hpo.py) fine-tunes from a pruned trial's final.pt, every epoch
    checkpointed, and tests the last.pt of a trial ASHA stopped: both slim here."""
    cfg, out, result = runs(True)
    search = cfg.replace(optim={"max_lr": 0.02})
    warm = out / "checkpoints" / "final.pt"
    kwargs = {"warm_start": warm, "finetune_only": True, "evaluate_test": False}
    with pytest.raises(Crash):
        run_trial(search, tmp_path, reporter=_crash_after(1), **kwargs)
    stopped, _ = model_from_checkpoint(tmp_path / "checkpoints" / "last.pt")  # ASHA stopped it
    assert _params(stopped) == result["inference"]["params"]
    searched = run_trial(search, tmp_path, **kwargs)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["stage"], r["epoch"]) for r in records] == [("finetune", 1), ("finetune", 2)]
    assert {r["achieved_sparsity"] for r in records} == {result["achieved_sparsity"]}
    assert searched["total_params"] == result["total_params"] and searched["pruned"] is None
    tuned, _ = model_from_checkpoint(tmp_path / "checkpoints" / "final.pt")
    base, _ = model_from_checkpoint(warm)
    assert _params(tuned) == _params(base)
    assert not all(
        torch.equal(p, q) for p, q in zip(tuned.parameters(), base.parameters(), strict=True)
    )


def test_finetuning_search_cuts_a_masked_final_checkpoint(runs, tmp_path) -> None:
    """A full-size final.pt (masked fine-tuning, or a corroprune from before slim fine-tuning)
    is cut when the search's fine-tuning starts."""
    cfg, out, result = runs(False)
    search = cfg.replace(pruning={"slim_finetune": None}, stages={"finetune_epochs": 1})
    warm = out / "checkpoints" / "final.pt"
    run_trial(search, tmp_path, warm_start=warm, finetune_only=True, evaluate_test=False)
    state = load_checkpoint(tmp_path / "checkpoints" / "final.pt")
    assert state["slim"]["achieved_sparsity"] == result["achieved_sparsity"]
    assert sum(t.numel() for t in state["model"].values()) < 0.7 * result["total_params"]


def test_a_slim_checkpoint_is_refused_where_it_cannot_be_used(runs, tmp_path) -> None:
    cfg, out, _ = runs(True)
    final = out / "checkpoints" / "final.pt"
    masked = cfg.replace(pruning={"slim_finetune": False})
    with pytest.raises(UserError, match="can only be fine-tuned slim"):
        run_trial(masked, tmp_path / "a", warm_start=final, finetune_only=True)
    with pytest.raises(UserError, match="only a fine-tuning-only start can use it"):
        run_trial(cfg, tmp_path / "b", warm_start=final)


@pytest.mark.parametrize("granularity", ["channel", "coupled"])
def test_the_cut_keeps_outputs_and_counts_and_compiles_the_slim_model(
    granularity: str, tmp_path, monkeypatch
) -> None:
    """At the cut the trial's model (and what torch.compile trains) becomes the slim one: same
    outputs, same sparsity record; a last.pt written then rebuilds it for a resume."""
    compiled = []  # (model, its parameter count then)

    def fake_compile(model: torch.nn.Module, mode: str) -> torch.nn.Module:
        compiled.append((model, _params(model)))
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    config = _tiny(
        model={"arch": "unet"},
        pruning={"pruner": "magnitude", "sparsity": 0.5, "granularity": granularity, "steps": 1},
        stages={"prune_epochs": 1},
        runtime={"compile": "default"},
    )
    cfg = TrialConfig.from_dict(config)
    trial = Trial(cfg, tmp_path, None, None)
    trial.pruner.end_of_epoch(1)  # magnitude: masks at the target
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before, stats = trial.model.eval()(x), trial._sparsity()
    full = _params(trial.model)
    trial.cut_slim()
    assert trial.pruner is None and _params(trial.model) < 0.8 * full
    assert [count for _, count in compiled] == [full, _params(trial.model)]
    assert compiled[-1][0] is trial.model is trial.train_model
    with torch.no_grad():
        torch.testing.assert_close(trial.model.eval()(x), before, atol=1e-5, rtol=1e-5)
    assert trial._sparsity() == stats
    optimizer, scheduler = build_optimizer(trial.model, cfg.optim)
    trial.save(Position(2, 0, 2), optimizer, scheduler)
    resumed = Trial(cfg, tmp_path, None, None)
    pos, state = resumed.restore()
    assert (pos.stage_index, resumed.pruner, resumed.cut) == (2, None, trial.cut)
    optimizer, _ = build_optimizer(resumed.model, cfg.optim)
    optimizer.load_state_dict(state["optimizer"])  # the same parameters, in the same order
    with torch.no_grad():
        assert torch.equal(resumed.model.eval()(x), trial.model(x))
