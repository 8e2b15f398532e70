"""The latency-budgeted search: its quiet room, a configuration stopped over budget, and a tiny
search on a real local Ray whose chosen artefact `corroprune evaluate` scores as the search did."""

import asyncio
import contextlib
import json
from pathlib import Path

import pytest
import yaml
from ray.tune.search.searcher import Searcher

from sweep.budget import (
    BudgetRequest,
    QuietRoom,
    finetune_limit,
    finish,
    mark_front,
    run_budget_search,
    settings_from,
    sweep_trials,
)
from sweep.budget_sampler import EpochBudget
from sweep.cli import main
from tests.conftest import tiny_config
from trainables.checkpoint import read_jsonl
from trainables.config import TrialConfig
from trainables.errors import UserError
from trainables.ray_entry import budget_config, run_budget_trial
from trainables.trial import run_trial

STAGES = {"train_epochs": 1, "prune_epochs": 2, "finetune_epochs": 1}
PRESET = {
    "budget": {
        "samples": 3,
        "finetune_epochs": 2,  # two configurations of one fine-tuning epoch each
        "repeats": 3,
        "startup_trials": 2,
        "sparsity": {"low": 0.4, "high": 0.7},
    },
    "sweep": {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": 1},
}


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> Path:
    """A dense model and one uniform-ratio coupled trial pruned from it, as a sweep leaves them."""
    run = tmp_path_factory.mktemp("sweep")
    dense = TrialConfig.from_dict(tiny_config(stages=STAGES, runtime={"threads": 1}))
    run_trial(dense, run / "trials" / "synthetic-fpn-dense-seed0")
    pruned = dense.replace(pruning={"pruner": "agp", "sparsity": 0.5, "granularity": "coupled"})
    run_trial(
        pruned,
        run / "trials" / "synthetic-fpn-agp-coupled-s0.5-seed0",
        warm_start=run / "trials" / "synthetic-fpn-dense-seed0" / "checkpoints" / "dense.pt",
    )
    return run


# ---- the quiet room -----------------------------------------------------------------------------


def test_a_measurement_waits_for_running_epochs_and_holds_new_ones_back() -> None:
    async def scenario() -> list[str]:
        room, log = QuietRoom(), []
        await room.enter_training("a", 5)

        async def measure() -> None:
            quiet = await room.enter_measuring("b", 5)
            log.append(f"measure quiet={quiet}")
            await asyncio.sleep(0.05)
            log.append("measured")
            await room.leave_measuring("b")

        async def next_epoch() -> None:
            await asyncio.sleep(0.01)  # asks once the measurement is waiting
            await room.enter_training("c", 5)
            log.append("epoch c")
            await room.leave_training("c")

        task, epoch = asyncio.create_task(measure()), asyncio.create_task(next_epoch())
        await asyncio.sleep(0.05)
        log.append("epoch a ends")
        await room.leave_training("a")
        await asyncio.gather(task, epoch)
        return log

    assert asyncio.run(scenario()) == ["epoch a ends", "measure quiet=True", "measured", "epoch c"]


def test_a_holder_that_never_leaves_cannot_block_the_search() -> None:
    async def scenario() -> tuple[bool, bool]:
        room = QuietRoom()
        await room.enter_training("dead", 5)  # a trial on a preempted node
        quiet = await room.enter_measuring("b", 0.05)
        later = await room.enter_training("c", 0.05)  # b never left either
        return quiet, later

    assert asyncio.run(scenario()) == (False, False)


# ---- one configuration, Ray aside ---------------------------------------------------------------


class OpenRoom:
    """A room with nobody else in it."""

    training = staticmethod(contextlib.nullcontext)

    @contextlib.contextmanager
    def measuring(self):
        yield True


def _budget_cfg(run: Path, ratios: dict[str, float]) -> TrialConfig:
    base = yaml.safe_load(
        (run / "trials" / "synthetic-fpn-agp-coupled-s0.5-seed0" / "config.yaml").read_text()
    )
    params = {"pruner": "agp", "sparsity": 0.6, **{f"ratio_{k}": v for k, v in ratios.items()}}
    return budget_config(base, params, list(ratios))


def test_a_configuration_over_budget_stops_before_fine_tuning(
    finished_sweep: Path, tmp_path: Path
) -> None:
    from deploy.timing import TimingSetup

    dense = finished_sweep / "trials" / "synthetic-fpn-dense-seed0" / "checkpoints" / "dense.pt"
    cfg = _budget_cfg(finished_sweep, {"encoder.stem": 0.0, "decoder": 1.0})
    assert cfg.pruning.stage_ratios == {"encoder.stem": 0.0, "decoder": 1.0}
    setup = TimingSetup("torch", (64, 64), 1, 2)
    over = run_budget_trial(cfg, tmp_path / "over", dense, setup, 0.0, OpenRoom())
    assert over["status"] == "over_budget" and over["latency_ms"] > 0 and over["quiet"]
    stages_run = [r["stage"] for r in read_jsonl(tmp_path / "over" / "metrics.jsonl")]
    assert stages_run == ["prune", "prune"]  # no fine-tuning epoch
    latency = tmp_path / "over" / "latency.json"
    stamp = latency.stat().st_mtime_ns
    again = run_budget_trial(cfg, tmp_path / "over", dense, setup, 0.0, OpenRoom())
    assert again == over and latency.stat().st_mtime_ns == stamp  # timed once

    done = run_budget_trial(cfg, tmp_path / "done", dense, setup, 1e9, OpenRoom())
    assert done["status"] == "finished" and done["epochs"] == 3
    assert done["achieved_sparsity"] == pytest.approx(0.6, abs=0.05)
    assert (tmp_path / "done" / "checkpoints" / "final.pt").exists()


# ---- settings and results, Ray aside ------------------------------------------------------------


def test_settings_and_selection_are_checked(finished_sweep: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no 'budget' section"):
        settings_from({}, 10, "onnx", 1, None)
    with pytest.raises(UserError, match="--runtime tensorrt: one of onnx, onnx-int8, torch"):
        settings_from(PRESET, 10, "tensorrt", 1, None)
    with pytest.raises(UserError, match="--budget-ms 0"):
        settings_from(PRESET, 0, "onnx", 1, None)
    with pytest.raises(UserError, match="budget.sparsity: expected"):
        settings_from({"budget": {"sparsity": {"low": 0.9, "high": 0.2}}}, 10, "onnx", 1, None)
    with pytest.raises(UserError, match="budget.pruners: 'none'"):
        settings_from({"budget": {"pruners": ["none"]}}, 10, "onnx", 1, None)
    with pytest.raises(UserError, match="budget.latency_floor: expected true or false, got 'y'"):
        settings_from({"budget": {"latency_floor": "y"}}, 10, "onnx", 1, None)
    with pytest.raises(UserError, match="budget.finetune_epochs: expected .* got 'all'"):
        settings_from({"budget": {"finetune_epochs": "all"}}, 10, "onnx", 1, None)
    with pytest.raises(UserError, match="budget.finetune_epochs: expected .* got 0"):
        settings_from({"budget": {"finetune_epochs": 0}}, 10, "onnx", 1, None)
    as_sweep = settings_from({"budget": {"finetune_epochs": "sweep"}}, 10, "onnx", 1, None)
    trials = sweep_trials(finished_sweep, {})
    assert finetune_limit(as_sweep, trials) == STAGES["finetune_epochs"]  # one coupled trial
    assert finetune_limit(settings_from(PRESET, 10, "onnx", 1, None), trials) == 2
    dense_only = [t for t in trials if t[1].is_dense]
    with pytest.raises(UserError, match="no finished coupled trial that fine-tuned"):
        finetune_limit(as_sweep, dense_only)
    with pytest.raises(UserError, match="no finished dense trial .* matches"):
        sweep_trials(finished_sweep, {"model": "unet"})
    broken = tmp_path / "trials" / "synthetic-fpn-dense-seed0"
    broken.mkdir(parents=True)
    (broken / "final.json").write_text("{}")
    (broken / "config.yaml").write_text("seed: [0")
    with pytest.raises(UserError, match="synthetic-fpn-dense-seed0/config.yaml is not valid YAML"):
        sweep_trials(tmp_path, {})


def test_the_front_is_what_nothing_beats() -> None:
    rows = [
        {"val_miou": 0.5, "latency_ms": 10.0, "status": "finished"},
        {"val_miou": 0.4, "latency_ms": 12.0, "status": "finished"},  # dominated
        {"val_miou": 0.6, "latency_ms": 30.0, "status": "finished"},
        {"val_miou": 0.9, "latency_ms": 40.0, "status": "over_budget"},  # never fine-tuned
        {"val_miou": None, "latency_ms": None, "status": "error"},
    ]
    mark_front(rows, budget_ms=20.0)
    assert [r["pareto"] for r in rows] == [True, False, True, False, False]
    assert [r["within_budget"] for r in rows] == [True, True, False, False, False]


class Proposals(Searcher):
    """A searcher proposing the same configuration every time, and remembering what it heard."""

    def __init__(self) -> None:
        super().__init__(metric="val_miou", mode="max")
        self.heard: list[str] = []

    def suggest(self, trial_id: str) -> dict:
        return {"arch": "fpn"}

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        self.heard.append(trial_id)

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self.heard))

    def restore(self, checkpoint_path: str) -> None:
        self.heard = json.loads(Path(checkpoint_path).read_text())


def test_the_search_ends_when_its_fine_tuning_epochs_are_spent(tmp_path: Path) -> None:
    from ray.tune.search import SearchGenerator

    search = EpochBudget(Proposals(), limit=10, planned={"fpn": 4, "unet": 5})
    assert search.suggest("a") == {"arch": "fpn"} and search.suggest("b") == {"arch": "fpn"}
    assert search.suggest("c") is None  # 8 may be spent, another might need 5: wait
    search.on_trial_complete("a", {"finetune_epochs": 0})  # over budget: none spent
    assert search.suggest("c") == {"arch": "fpn"}
    SearchGenerator(search).save_to_dir(str(tmp_path), "s")  # as Tune checkpoints it
    search.on_trial_complete("b", {"finetune_epochs": 4})
    search.on_trial_complete("c", None, error=True)  # counts what it planned
    assert search.spent == 8 and search.suggest("d") == Searcher.FINISHED
    assert search.searcher.heard == ["a", "b", "c"]

    restored = EpochBudget(Proposals(), limit=10, planned={"fpn": 4, "unet": 5})
    SearchGenerator(restored).restore_from_dir(str(tmp_path))  # as a resumed search reads it
    assert restored.live == {"b": 4, "c": 4} and restored.spent == 0
    assert restored.searcher.heard == ["a"]


# ---- a tiny search on a real Ray ----------------------------------------------------------------


def test_budget_search_end_to_end(
    local_ray, finished_sweep: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    settings = settings_from(PRESET, 1e4, "onnx", 1, None)
    request = BudgetRequest(settings, finished_sweep, tmp_path / "search", {})
    results = run_budget_search(request)
    # The third configuration would spend a third fine-tuning epoch: the search ends at two.
    assert len(results["trials"]) == 2 and results["runtime"] == "onnx"
    assert results["finetune_epochs"] == {"limit": 2, "spent": 2}
    assert results["driver_timing"]["load_1min"] >= 0  # how busy the machine was when timing
    for row in results["trials"]:
        assert row["status"] == "finished" and row["within_budget"], row
        assert set(row["stage_ratios"]) >= {"decoder", "encoder.stem"}
        latency = json.loads((Path(row["out_dir"]) / "latency.json").read_text())
        assert latency["quiet"] and latency["runtime"] == "onnx" and latency["threads"] == 1
        config = yaml.safe_load((Path(row["out_dir"]) / "config.yaml").read_text())
        assert config["pruning"]["stage_ratios"] == row["stage_ratios"]
    assert {b["trial"] for b in results["baselines"]} == {
        "synthetic-fpn-dense-seed0",
        "synthetic-fpn-agp-coupled-s0.5-seed0",
    }
    chosen = results["chosen"]
    best = max(r["val_miou"] for r in results["trials"])
    assert chosen["val_miou"] == best and Path(chosen["artefact"]).name == "model.onnx"
    assert (tmp_path / "search" / "report.html").exists()

    # The artefact scores as the search reported, through the command users run.
    capsys.readouterr()
    assert main(["evaluate", chosen["artefact"]]) == 0
    assert f"mIoU {chosen['test_miou']:.4f}" in capsys.readouterr().out

    # Run again: the finished search is read back, nothing re-runs.
    again = run_budget_search(request)
    assert [r["trial_id"] for r in again["trials"]] == [r["trial_id"] for r in results["trials"]]
    other = BudgetRequest(
        settings_from(PRESET, 5, "onnx", 1, None), finished_sweep, request.out, {}
    )
    with pytest.raises(UserError, match="other settings \\(budget_ms"):
        run_budget_search(other)
    # A search started before latency_floor existed ran without a floor: it resumes with false.
    stored = json.loads((request.out / "budget.json").read_text())
    stored.pop("latency_floor")
    (request.out / "budget.json").write_text(json.dumps(stored))
    with pytest.raises(UserError, match="latency_floor: False now True"):
        run_budget_search(request)
    whole_front = {"budget": {**PRESET["budget"], "latency_floor": False}, "sweep": PRESET["sweep"]}
    older = BudgetRequest(
        settings_from(whole_front, 1e4, "onnx", 1, None), finished_sweep, request.out, {}
    )
    assert len(run_budget_search(older)["trials"]) == 2

    # A budget nothing meets: the results are written, and the error names the fastest model.
    from deploy.timing import TimingSetup

    tight = settings_from(PRESET, 1e-6, "onnx", 1, None)
    request = BudgetRequest(tight, finished_sweep, tmp_path / "t", {})
    with pytest.raises(UserError, match="no searched model runs under 1e-06 ms .* fastest model"):
        finish(
            request, results["trials"], results["baselines"], TimingSetup("onnx", (64, 64), 1, 3)
        )
    assert json.loads((tmp_path / "t" / "results.json").read_text())["chosen"] is None


def test_the_search_starts_knowing_the_sweeps_uniform_trials() -> None:
    from ray.tune.search.optuna import OptunaSearch

    from sweep.budget import prior_study, search_space
    from sweep.budget_sampler import CONSTRAINT, BudgetSampler

    settings = settings_from(PRESET, 20.0, "onnx", 1, None)
    row = {"arch": "fpn", "pruner": "agp", "val_miou": 0.5, "latency_ms": 30.0, "trial": "t"}
    baselines = [
        {**row, "sparsity": 0.5, "granularity": "coupled", "scope": "layer"},
        {**row, "sparsity": 0.5, "granularity": "element", "scope": "layer"},  # not in the space
        {**row, "sparsity": 0.9, "granularity": "coupled", "scope": "layer"},  # out of its range
        {**row, "sparsity": 0.6, "granularity": "coupled", "scope": "layer", "latency_ms": 12.0},
    ]
    stages = ["decoder", "encoder.stem"]
    sampler = BudgetSampler(20.0, seed=0)
    study = prior_study(settings, sampler, baselines, ["fpn"], ("agp",), stages)
    search = OptunaSearch(
        metric=["val_miou", "latency_ms"],
        mode=["max", "min"],
        sampler=sampler,
        storage=study._storage,
        study_name=study.study_name,
    )
    space = search_space(settings, ["fpn"], ("agp",), stages)
    assert search.set_search_properties(None, None, {"search": {}, **space})
    known, fast = search._ot_study.trials  # Ray's study is the one holding the sweep's trials
    assert known.values == [0.5, 30.0] and known.system_attrs[CONSTRAINT] == 10.0
    # Under the budget, latency counts as the budget: it ranks on validation mIoU alone.
    assert fast.values == [0.5, 20.0] and fast.system_attrs[CONSTRAINT] == 0.0
    measured = settings_from(
        {"budget": {**PRESET["budget"], "latency_floor": False}}, 20.0, "onnx", 1, None
    )
    study = prior_study(measured, BudgetSampler(20.0), baselines, ["fpn"], ("agp",), stages)
    assert [t.values for t in study.trials] == [[0.5, 30.0], [0.5, 12.0]]
    assert known.params == {
        "arch": "fpn",
        "pruner": "agp",
        "sparsity": 0.5,
        "ratio_decoder": 1.0,
        "ratio_encoder.stem": 1.0,
    }
    assert isinstance(search.suggest("trial-1"), dict)  # proposals go on from there


def test_the_command_checks_its_flags_before_starting_anything(
    finished_sweep: Path, tmp_path: Path, capsys
) -> None:
    base = ["tune", "--preset", "budget-search", "--from", str(finished_sweep)]
    out = ["--out", str(tmp_path / "s")]
    assert main([*base, *out]) == 2
    assert "needs --budget-ms MS" in capsys.readouterr().err
    assert main([*base, *out, "--budget-ms", "5", "--runtime", "tflite"]) == 2
    assert "--runtime tflite: one of onnx, onnx-int8, torch" in capsys.readouterr().err
    assert main([*base, *out, "--budget-ms", "5", "--select", "model=unet"]) == 2
    assert "no finished dense trial" in capsys.readouterr().err
    finetune = ["tune", "--from", str(finished_sweep), *out, "--budget-ms", "5"]
    assert main(finetune) == 2
    assert "is not a budget search" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
