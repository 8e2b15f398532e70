"""Latency-budgeted search: the most accurate pruned model that runs under a measured latency
budget, found by a multi-objective Ray Tune search (Optuna; validation mIoU up, latency down).

Each search trial starts from one of the sweep's dense models and prunes coupled channels with a
searched pruner, target sparsity and per-stage channel ratios (`pruning.stage_ratios`). Once it
has cut its slim model, before fine-tuning, it measures the model's batch-1 latency in the chosen
runtime in the quiet room (`QuietRoom`): one measurement at a time, while every other trial of
the search waits between epochs. A trial clearly over budget stops there. The chosen model (best
validation mIoU within budget) is evaluated once on the test split and exported to
SEARCH_DIR/chosen/. The sweep's own pruned trials are timed the same way, for comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sweep import identity
from trainables.checkpoint import read_jsonl, write_json, write_yaml
from trainables.config import TrialConfig
from trainables.errors import UserError

FORMAT = "corroprune-budget-v1"
SETTINGS_FILE = "budget.json"  # what the search was started with; a resume must match it
SETTINGS_BEFORE = {"finetune_epochs": None, "latency_floor": False}  # absent from older files
RESULTS_FILE = "results.json"
BASELINES_FILE = "baselines.json"
RUNTIMES = ("onnx", "onnx-int8", "torch")
COUPLED_PRUNERS = ("lp", "agp", "mp", "magnitude")
NAMESPACE = "corroprune"
RATIO = "ratio_"  # search-space key prefix of a stage's channel ratio


# ---- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetSettings:
    """One budget search, resolved from the preset and the command line."""

    budget_ms: float
    runtime: str
    threads: int
    samples: int  # at most this many configurations
    seed: int = 0
    # at most this many fine-tuning epochs in all: a number, "sweep" (as many as the sweep's
    # coupled trials used), or None (no limit; `samples` alone ends the search)
    finetune_epochs: int | str | None = None
    repeats: int = 20
    startup_trials: int = 8  # random proposals before Optuna's TPE models the results
    over_budget_margin: float = 0.1  # stop before fine-tuning above budget * (1 + margin)
    # Optuna ranks a latency under the budget as the budget: the search looks for the most
    # accurate model under it, not the whole front (False: measured latency, the whole front)
    latency_floor: bool = True
    quiet_timeout_s: float = 600.0
    pruners: tuple[str, ...] = ()  # () -> the sweep's own pruners that prune coupled channels
    sparsity: tuple[float, float] = (0.3, 0.95)
    # relative channel ratios per stage; the sweep's uniform trials sit at the middle
    stage_ratio: tuple[float, float] = (0.25, 1.75)
    trial: dict[str, Any] = field(default_factory=dict)  # trial-config overrides
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    max_concurrent: int = 0

    def results_part(self) -> dict[str, Any]:
        """What changes results: a resume must agree on it (resources may change)."""
        out = asdict(self)
        for key in ("samples", "cpus_per_trial", "gpus_per_trial", "max_concurrent"):
            out.pop(key)
        return json.loads(json.dumps(out))


def _pair(raw: Any, key: str, lo: float, hi: float) -> tuple[float, float]:
    if not (isinstance(raw, dict) and set(raw) == {"low", "high"}):
        raise UserError(f"budget.{key}: expected {{low: L, high: H}}, got {raw!r}")
    low, high = float(raw["low"]), float(raw["high"])
    if not lo <= low <= high <= hi:
        raise UserError(f"budget.{key}: expected {lo} <= low <= high <= {hi}, got {raw!r}")
    return low, high


def _flag(raw: Any, key: str) -> bool:
    if not isinstance(raw, bool):
        raise UserError(f"budget.{key}: expected true or false, got {raw!r}")
    return raw


def _epoch_limit(raw: Any) -> int | str | None:
    if raw is None or raw == "sweep":
        return raw
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
        return raw
    raise UserError(
        f"budget.finetune_epochs: expected a number of epochs (1 or more), 'sweep' (as many as "
        f"the sweep's coupled trials fine-tuned) or null (no limit), got {raw!r}"
    )


def settings_from(
    preset: dict[str, Any], budget_ms: float, runtime: str, threads: int, samples: int | None
) -> BudgetSettings:
    """The preset's `budget` and `sweep` sections with the command line's values."""
    raw = dict(preset.get("budget") or {})
    if not raw:
        raise UserError("the preset has no 'budget' section (use --preset budget-search)")
    allowed = {
        "samples",
        "seed",
        "repeats",
        "startup_trials",
        "over_budget_margin",
        "latency_floor",
        "quiet_timeout_s",
        "pruners",
        "sparsity",
        "stage_ratio",
        "finetune_epochs",
    }
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise UserError(f"unknown budget key '{unknown[0]}'; allowed: {', '.join(sorted(allowed))}")
    if not (budget_ms > 0 and math.isfinite(budget_ms)):
        raise UserError(f"--budget-ms {budget_ms}: a latency in milliseconds above 0")
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime {runtime}: one of {', '.join(RUNTIMES)}")
    if threads < 1:
        raise UserError(f"--threads {threads}: at least 1")
    pruners = tuple(raw.get("pruners") or ())
    bad = [p for p in pruners if p not in COUPLED_PRUNERS]
    if bad:
        raise UserError(f"budget.pruners: {bad[0]!r}; allowed: {', '.join(COUPLED_PRUNERS)}")
    sweep = preset.get("sweep") or {}
    out = BudgetSettings(
        budget_ms=float(budget_ms),
        runtime=runtime,
        threads=int(threads),
        samples=int(samples or raw.get("samples", 24)),
        seed=int(raw.get("seed", 0)),
        finetune_epochs=_epoch_limit(raw.get("finetune_epochs")),
        repeats=int(raw.get("repeats", 20)),
        startup_trials=int(raw.get("startup_trials", 8)),
        over_budget_margin=float(raw.get("over_budget_margin", 0.1)),
        latency_floor=_flag(raw.get("latency_floor", True), "latency_floor"),
        quiet_timeout_s=float(raw.get("quiet_timeout_s", 600)),
        pruners=pruners,
        sparsity=_pair(raw.get("sparsity", {"low": 0.3, "high": 0.95}), "sparsity", 0.0, 0.99),
        stage_ratio=_pair(
            raw.get("stage_ratio", {"low": 0.25, "high": 1.75}), "stage_ratio", 0.0, 100.0
        ),
        trial=dict(preset.get("trial") or {}),
        cpus_per_trial=float(sweep.get("cpus_per_trial", 1)),
        gpus_per_trial=float(sweep.get("gpus_per_trial", 0)),
        max_concurrent=int(sweep.get("max_concurrent", 0)),
    )
    if out.stage_ratio[1] <= 0:
        raise UserError("budget.stage_ratio: high above 0 (a stage at 0 keeps every channel)")
    if out.samples < 1 or out.repeats < 1 or out.over_budget_margin < 0:
        raise UserError("budget: samples and repeats at least 1, over_budget_margin 0 or more")
    return out


# ---- what the sweep gives: dense bases and its own pruned trials -------------------------------


@dataclass(frozen=True)
class Base:
    """A dense model of the sweep the search prunes, with the trial settings to prune it with."""

    arch: str
    checkpoint: Path  # the dense trial's checkpoints/dense.pt
    config: dict[str, Any]  # a pruned trial's config of the same model (else the dense one's)
    stages: tuple[str, ...]  # the model's stage names (`pruning.stage_ratios` keys)


def _trials(run_dir: Path) -> list[tuple[Path, identity.TrialId, dict[str, Any]]]:
    trials_dir = run_dir / "trials"
    if not trials_dir.is_dir():
        raise UserError(f"{run_dir} is not a sweep folder (no trials/); give --from RUN_DIR")
    found = []
    for trial in sorted(trials_dir.iterdir()):
        if not ((trial / "final.json").exists() and (trial / "config.yaml").exists()):
            continue
        try:
            cfg = yaml.safe_load((trial / "config.yaml").read_text())
        except yaml.YAMLError as err:
            raise UserError(f"{trial / 'config.yaml'} is not valid YAML: {err}") from None
        who = identity.trial_id(trial.name, cfg)
        if who is not None:
            found.append((trial, who, cfg))
    return found


def sweep_trials(
    run_dir: Path, select: dict[str, Any]
) -> list[tuple[Path, identity.TrialId, dict]]:
    """The finished trials of one dataset and seed of the sweep (`select` narrows them)."""
    found = [t for t in _trials(run_dir) if t[1].matches(select)]
    if not any(who.is_dense for _, who, _ in found):
        raise UserError(
            f"no finished dense trial in {run_dir / 'trials'} matches --select {select or 'all'}"
        )
    for axis in ("dataset", "seed", "encoder"):
        values = sorted({str(getattr(who, axis)) for _, who, _ in found})
        if len(values) > 1:
            raise UserError(
                f"the sweep has several {axis}s ({', '.join(values)}): the search starts from "
                f"one; add it to --select, e.g. --select {axis}={values[0]}"
            )
    return found


def model_stages(cfg: TrialConfig) -> tuple[str, ...]:
    """Stage names of the model's coupled channel groups (built without weights)."""
    from trainables.models import build_model
    from trainables.pruning.coupled import model_stages as stages_of

    model = build_model(cfg.replace(model={"encoder_weights": None}).model, cfg.data.classes)
    return tuple(stages_of(model, cfg.pruning.exclude))


def bases(
    trials: list[tuple[Path, identity.TrialId, dict]], overrides: dict[str, Any]
) -> dict[str, Base]:
    """One per model of the sweep with a dense checkpoint: the search's architectures."""
    out = {}
    for trial, who, cfg in trials:
        dense_pt = trial / "checkpoints" / "dense.pt"
        if not who.is_dense or not dense_pt.exists():
            continue
        pruned = [c for _, w, c in trials if w.model == who.model and not w.is_dense]
        config = TrialConfig.from_dict(pruned[0] if pruned else cfg).replace(**overrides)
        out[who.model] = Base(who.model, dense_pt, config.to_dict(), model_stages(config))
    if not out:
        raise UserError("no dense trial of the sweep kept its checkpoints/dense.pt to prune from")
    return out


def search_pruners(settings: BudgetSettings, trials: list) -> tuple[str, ...]:
    if settings.pruners:
        return settings.pruners
    found = sorted({who.pruner for _, who, _ in trials if who.pruner in COUPLED_PRUNERS})
    return tuple(found) or ("agp",)


def finetune_limit(
    settings: BudgetSettings, trials: list[tuple[Path, identity.TrialId, dict]]
) -> int | None:
    """The search's fine-tuning epochs in all: `budget.finetune_epochs`, with "sweep" counted
    from the fine-tuning epochs the selected sweep trials that pruned coupled channels ran."""
    if settings.finetune_epochs != "sweep":
        return settings.finetune_epochs
    coupled = [t for t, who, _ in trials if not who.is_dense and who.granularity == "coupled"]
    spent = sum(
        sum(1 for r in read_jsonl(t / "metrics.jsonl") if r.get("stage") == "finetune")
        for t in coupled
    )
    if spent < 1:
        raise UserError(
            "budget.finetune_epochs: 'sweep', but the sweep has no finished coupled trial that "
            "fine-tuned; give a number of epochs, or null for no limit"
        )
    return spent


def planned_epochs(models: dict[str, Base]) -> dict[str, int]:
    """Fine-tuning epochs a configuration within budget runs, per architecture."""
    return {
        arch: TrialConfig.from_dict(b.config).stages.finetune_epochs for arch, b in models.items()
    }


def test_size(cfg: dict[str, Any]) -> tuple[int, int]:
    """(H, W) of the first test image as the trials evaluate it (padded)."""
    from deploy.evaluate import split_dataset

    image = split_dataset(TrialConfig.from_dict(cfg).data, "test")[0][0]  # (3, H, W)
    return int(image.shape[-2]), int(image.shape[-1])


# ---- the quiet room: latency measured alone -----------------------------------------------------


class QuietRoom:
    """A readers-writer gate for one search (a Ray actor, `quiet_room`): trials hold it shared
    for each training epoch and alone for a latency measurement, so a measurement waits for
    running epochs to end and no epoch starts until it is done. A holder that died (a preempted
    node) cannot block the search: every wait gives up after `timeout` s, and a measurement
    then taken is recorded as not quiet."""

    def __init__(self) -> None:
        self.training: Counter[str] = Counter()
        self.measuring: set[str] = set()
        self.waiting = 0
        self.cond = asyncio.Condition()

    async def _wait(self, ready: Any, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not ready():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):  # the lock is held again either way
                await asyncio.wait_for(self.cond.wait(), remaining)
        return True

    async def enter_training(self, who: str, timeout: float) -> bool:
        async with self.cond:
            ok = await self._wait(lambda: not self.measuring and not self.waiting, timeout)
            self.training[who] += 1
            return ok

    async def leave_training(self, who: str) -> None:
        async with self.cond:
            self.training[who] -= 1
            if self.training[who] <= 0:
                del self.training[who]
            self.cond.notify_all()

    async def enter_measuring(self, who: str, timeout: float) -> bool:
        """True when nothing else trains or measures now (the measurement is quiet)."""
        async with self.cond:
            self.waiting += 1
            try:
                return await self._wait(
                    lambda: not self.measuring and not (set(self.training) - {who}), timeout
                )
            finally:
                self.waiting -= 1
                self.measuring.add(who)

    async def leave_measuring(self, who: str) -> None:
        async with self.cond:
            self.measuring.discard(who)
            self.cond.notify_all()

    async def state(self) -> dict[str, Any]:
        return {"training": dict(self.training), "measuring": sorted(self.measuring)}


def quiet_room(name: str) -> Any:
    """The search's quiet room actor (created by the driver, found by name by its trials)."""
    import ray

    actor = ray.remote(QuietRoom).options(
        name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=0, max_concurrency=1000
    )
    return actor.remote()


# ---- the search ---------------------------------------------------------------------------------


def room_name(out: Path) -> str:
    import hashlib

    return "quiet-room-" + hashlib.sha256(str(out).encode()).hexdigest()[:12]


def search_space(
    settings: BudgetSettings, archs: list[str], pruners: tuple[str, ...], stages: list[str]
) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {
        "arch": tune.choice(archs),
        "pruner": tune.choice(list(pruners)),
        "sparsity": tune.uniform(*settings.sparsity),
    }
    for stage in stages:
        space[RATIO + stage] = tune.uniform(*settings.stage_ratio)
    return space


@dataclass(frozen=True)
class BudgetRequest:
    settings: BudgetSettings
    run_dir: Path
    out: Path
    select: dict[str, Any]
    address: str | None = None


def _check_settings(out: Path, settings: BudgetSettings, run_dir: Path) -> None:
    """A SEARCH_DIR is resumed only with what it was started with (resources may change)."""
    path = out / SETTINGS_FILE
    wanted = {"run_dir": str(run_dir), **settings.results_part()}
    if path.exists():
        # A search started before a setting existed ran as that setting's "off" value does.
        stored = {**SETTINGS_BEFORE, **json.loads(path.read_text())}
        changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        if changed:
            raise UserError(
                f"{out} holds a budget search started with other settings ({', '.join(changed)}: "
                f"{', '.join(f'{stored.get(k)!r} now {wanted.get(k)!r}' for k in changed)}); "
                "resume it with the same ones or choose a new --out"
            )
    else:
        write_json(path, wanted)


def trial_settings(
    models: dict[str, Base], out: Path, settings: BudgetSettings, size: tuple[int, int]
) -> dict[str, Any]:
    """What every search trial gets besides its proposal (`search` in its Tune config)."""
    from sweep.tune import trial_environment
    from trainables.provenance import code_version

    return {
        "bases": {
            arch: {"checkpoint": str(b.checkpoint), "config": b.config, "stages": list(b.stages)}
            for arch, b in models.items()
        },
        "out_root": str(out / "trials"),
        "budget_ms": settings.budget_ms,
        "limit_ms": settings.budget_ms * (1 + settings.over_budget_margin),
        "floor_ms": settings.budget_ms if settings.latency_floor else 0.0,
        "timing": {
            "runtime": settings.runtime,
            "size": list(size),
            "threads": settings.threads,
            "repeats": settings.repeats,
        },
        "room": room_name(out),
        "quiet_timeout_s": settings.quiet_timeout_s,
        "env": trial_environment(),
        "code_version": code_version(),
    }


def new_tuner(
    trainable: Any,
    space: dict[str, Any],
    settings: BudgetSettings,
    baselines: list[dict[str, Any]],
    models: dict[str, Base],
    pruners: tuple[str, ...],
    stages: list[str],
    out: Path,
    limit: int | None = None,
) -> Any:
    """A fresh search: Optuna's constrained multi-objective TPE, its study seeded with the
    sweep's uniform-ratio trials; with `limit`, it ends once that many fine-tuning epochs are
    spent (`EpochBudget`), or after `samples` configurations, whichever comes first."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from sweep.budget_sampler import BudgetSampler, EpochBudget
    from trainables.ray_entry import OBJECTIVE

    sampler = BudgetSampler(
        settings.budget_ms,
        seed=settings.seed,
        n_startup_trials=min(settings.startup_trials, settings.samples),
        multivariate=True,
    )
    study = prior_study(settings, sampler, baselines, sorted(models), pruners, stages)
    search = OptunaSearch(
        metric=["val_miou", OBJECTIVE],
        mode=["max", "min"],
        sampler=sampler,
        storage=study._storage,  # Ray loads the study with the sweep's results in it
        study_name=study.study_name,
    )
    if limit is not None:
        search = EpochBudget(search, limit, planned_epochs(models))
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            num_samples=settings.samples,
            search_alg=search,
            max_concurrent_trials=settings.max_concurrent or None,
            reuse_actors=True,  # one process per slot, as in the sweep
        ),
        run_config=tune.RunConfig(
            name="search",
            storage_path=str(out),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )


def run_budget_search(request: BudgetRequest) -> dict[str, Any]:
    """The search (resumed if SEARCH_DIR holds one), then the results: every configuration, the
    Pareto front, the sweep's trials timed alike, and the chosen model exported and tested."""
    import warnings

    import optuna
    import ray
    from ray import tune

    from deploy.timing import TimingSetup
    from sweep.tune import _init_ray, cluster_gpus_per_trial
    from trainables.ray_entry import budget_trial

    settings, out = request.settings, request.out.resolve()
    run_dir = request.run_dir.resolve()
    trials = sweep_trials(run_dir, request.select)
    models = bases(trials, settings.trial)
    first = next(iter(models.values()))
    size = test_size(first.config)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings, run_dir)
    stages = sorted({s for b in models.values() for s in b.stages})
    pruners = search_pruners(settings, trials)
    limit = finetune_limit(settings, trials)
    # The sweep's own models first, while nothing else runs (not even a starting Ray): the
    # comparison, and what the search knows before its first proposal.
    setup = TimingSetup(settings.runtime, size, settings.threads, settings.repeats)
    busy = busy_now(settings.threads)
    baselines = time_baselines(trials, setup, out)
    _init_ray(request.address)
    gpus = cluster_gpus_per_trial(settings.gpus_per_trial, request.address)
    room = quiet_room(room_name(out))  # held: an actor without a handle is collected
    fixed = trial_settings(models, out, settings, size)
    space = {"search": fixed, **search_space(settings, sorted(models), pruners, stages)}
    trainable = tune.with_resources(budget_trial, {"cpu": settings.cpus_per_trial, "gpu": gpus})
    path = out / "search"
    epochs = "" if limit is None else f" or {limit} fine-tuning epochs in all"
    print(
        f"budget search: up to {settings.samples} configurations{epochs} of "
        f"{', '.join(sorted(models))} ({', '.join(pruners)}), under {settings.budget_ms:g} ms in "
        f"{settings.runtime} ({settings.threads} threads, {size[0]}x{size[1]}, batch 1)",
        flush=True,
    )
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if tune.Tuner.can_restore(str(path)):
        print(f"resuming the search from {path}", flush=True)
        tuner = tune.Tuner.restore(
            str(path), trainable=trainable, resume_errored=True, param_space=space
        )
    else:
        tuner = new_tuner(
            trainable, space, settings, baselines, models, pruners, stages, out, limit
        )
    grid = tuner.fit()
    ray.kill(room)
    rows = search_rows(grid)
    return finish(request, rows, baselines, setup, busy, limit)


def prior_study(
    settings: BudgetSettings,
    sampler: Any,
    baselines: list[dict[str, Any]],
    archs: list[str],
    pruners: tuple[str, ...],
    stages: list[str],
) -> Any:
    """An Optuna study holding the sweep's uniform-ratio coupled trials as finished trials of the
    search space (every stage at the same ratio, the middle of `stage_ratio`; their validation
    mIoU and measured latency, floored at the budget with `budget.latency_floor`), so TPE models
    the results the sweep already paid for before its first proposal, and proposes around the
    best of them."""
    import optuna

    from sweep.budget_sampler import CONSTRAINT
    from trainables.ray_entry import objective_latency

    distributions = {
        "arch": optuna.distributions.CategoricalDistribution(archs),
        "pruner": optuna.distributions.CategoricalDistribution(list(pruners)),
        "sparsity": optuna.distributions.FloatDistribution(*settings.sparsity),
        **{
            RATIO + s: optuna.distributions.FloatDistribution(*settings.stage_ratio) for s in stages
        },
    }
    study = optuna.create_study(
        storage=optuna.storages.InMemoryStorage(),
        study_name="budget-search",
        directions=["maximize", "minimize"],
        sampler=sampler,
    )
    low, high = settings.sparsity
    floor = settings.budget_ms if settings.latency_floor else 0.0
    for b in baselines:
        uniform = b["granularity"] == "coupled" and b["scope"] == "layer" and not b.get("ratios")
        known = b["arch"] in archs and b["pruner"] in pruners and low <= b["sparsity"] <= high
        if not (uniform and known and b["val_miou"] is not None):
            continue
        params = {"arch": b["arch"], "pruner": b["pruner"], "sparsity": b["sparsity"]}
        params.update({RATIO + s: sum(settings.stage_ratio) / 2 for s in stages})  # uniform
        latency = objective_latency(b["latency_ms"], floor)
        study.add_trial(
            optuna.trial.create_trial(
                values=[b["val_miou"], latency],
                params=params,
                distributions=distributions,
                system_attrs={CONSTRAINT: latency - settings.budget_ms},
                user_attrs={"sweep_trial": b["trial"]},
            )
        )
    return study


# ---- results ------------------------------------------------------------------------------------


def search_rows(grid: Any) -> list[dict[str, Any]]:
    """A row per search configuration, from Tune's results (the last report of each trial)."""
    rows = []
    for result in grid:
        config = result.config or {}
        if "arch" not in config:
            continue
        metrics = result.metrics or {}
        stages = config["search"]["bases"][config["arch"]]["stages"]
        trial_id = metrics.get("trial_id") or Path(result.path).name
        status = metrics.get("status") if result.error is None else "error"
        rows.append(
            {
                "trial_id": trial_id,
                "arch": config["arch"],
                "pruner": config["pruner"],
                "sparsity": float(config["sparsity"]),
                "stage_ratios": {s: float(config[RATIO + s]) for s in stages},
                "status": status or "error",
                "val_miou": _number(metrics.get("val_miou")),
                "latency_ms": _number(metrics.get("latency_ms")),
                "latency_p90_ms": _number(metrics.get("latency_p90_ms")),
                "quiet": metrics.get("quiet"),
                "cpu": metrics.get("cpu"),
                "achieved_sparsity": _number(metrics.get("achieved_sparsity")),
                "params": metrics.get("params"),
                "finetune_epochs": metrics.get("finetune_epochs"),
                "error": None if result.error is None else _first_line(result.error),
                "out_dir": str(Path(config["search"]["out_root"]) / trial_id),
            }
        )
    return sorted(rows, key=lambda r: r["trial_id"])


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def mark_front(rows: list[dict[str, Any]], budget_ms: float) -> None:
    """`within_budget` and `pareto` (not dominated in validation mIoU up, latency down, among
    the rows with both) on every row, in place."""
    scored = [r for r in rows if r.get("val_miou") is not None and r.get("latency_ms") is not None]
    for r in rows:
        finished = r.get("status", "finished") == "finished"
        r["within_budget"] = bool(finished and r in scored and r["latency_ms"] <= budget_ms)
        r["pareto"] = (
            r in scored
            and finished
            and not any(
                o is not r
                and o.get("status", "finished") == "finished"
                and o["val_miou"] >= r["val_miou"]
                and o["latency_ms"] <= r["latency_ms"]
                and (o["val_miou"] > r["val_miou"] or o["latency_ms"] < r["latency_ms"])
                for o in scored
            )
        )


def _last_val_miou(trial_dir: Path) -> float | None:
    records = [r for r in read_jsonl(trial_dir / "metrics.jsonl") if "val_miou" in r]
    return _number(records[-1]["val_miou"]) if records else None


def time_baselines(
    trials: list[tuple[Path, identity.TrialId, dict]], setup: Any, out: Path
) -> list[dict[str, Any]]:
    """The sweep's finished trials, their deployable models timed as the search's are (each
    distinct architecture once, all prepared before any is timed, in interleaved rounds); cached
    in SEARCH_DIR/baselines.json."""
    from analysis.latency import deployable, signature
    from deploy.timing import parameter_count, prepare, time_rounds

    path = out / BASELINES_FILE
    cached = json.loads(path.read_text()) if path.exists() else {}
    todo = [(trial, who, raw) for trial, who, raw in trials if trial.name not in cached]
    runners: dict[str, Any] = {}
    params: dict[str, int] = {}
    keys: dict[str, str] = {}
    for trial, _, raw in todo:
        cfg = TrialConfig.from_dict(raw)
        model = deployable(trial, cfg)
        keys[trial.name] = key = signature(model, setup.size)
        if key not in runners:
            runners[key] = prepare(model, cfg, setup, out / "baselines" / key)
            params[key] = parameter_count(model)
    timed = time_rounds(runners, setup) if runners else {}
    for trial, who, raw in todo:
        key = keys[trial.name]
        final = json.loads((trial / "final.json").read_text())
        summary = final.get("pruned") or final.get("dense") or {}
        cached[trial.name] = {
            "trial": trial.name,
            "arch": who.model,
            "pruner": who.pruner,
            "sparsity": who.sparsity,
            "granularity": None if who.is_dense else who.granularity,
            "scope": raw.get("pruning", {}).get("scope"),
            "ratios": raw.get("pruning", {}).get("stage_ratios"),
            "val_miou": _last_val_miou(trial),
            "test_miou": _number(summary.get("test_miou")),
            **timed[key],
            "params": params[key],
        }
    if todo:
        write_json(path, cached)
    return [cached[trial.name] for trial, _, _ in trials]


def export_chosen(row: dict[str, Any], setup: Any, out: Path) -> dict[str, Any]:
    """The chosen model as the runtime's artefact in SEARCH_DIR/chosen/ with its config, timed
    and scored once on the test split, exactly as `corroprune evaluate ARTEFACT` scores it."""
    from deploy.artefacts import load_artefact
    from deploy.evaluate import evaluate, evaluation_data
    from deploy.export import export_compact
    from deploy.timing import FILES, prepare, time_rounds

    folder = out / "chosen"
    source = load_artefact(Path(row["out_dir"]) / "checkpoints" / "final.pt")  # slim
    runner = prepare(source.model, source.cfg, setup, folder)
    timing = time_rounds({"chosen": runner}, setup)["chosen"]
    if setup.runtime == "torch":
        path = export_compact(source.model, source.cfg, folder / "model.safetensors")
    else:
        path = folder / FILES[setup.runtime]
    write_yaml(folder / "config.yaml", source.cfg.to_dict())
    artefact = load_artefact(path, threads=setup.threads)
    scores = evaluate(artefact, evaluation_data(artefact, None, None), "test")
    return {
        **row,
        "test_miou": scores["miou"],
        "test_miou_corrosion": scores["miou_corrosion"],
        "test_images": scores["images"],
        "artefact": str(path),
        "artefact_latency_ms": timing["latency_ms"],
        "artefact_latency_p90_ms": timing["latency_p90_ms"],
        "config": str(folder / "config.yaml"),
    }


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    within = [r for r in rows if r["within_budget"] and r.get("val_miou") is not None]
    return max(within, key=lambda r: (r["val_miou"], -r["latency_ms"])) if within else None


def _fastest(rows: list[dict], baselines: list[dict]) -> dict[str, Any] | None:
    timed = [("search", r["trial_id"], r) for r in rows if r.get("latency_ms") is not None]
    timed += [("baseline", b["trial"], b) for b in baselines if b.get("latency_ms") is not None]
    if not timed:
        return None
    source, name, row = min(timed, key=lambda t: t[2]["latency_ms"])
    return {
        "source": source,
        "name": name,
        "arch": row["arch"],
        "pruner": row["pruner"],
        "sparsity": row["sparsity"],
        "latency_ms": row["latency_ms"],
    }


def busy_now(threads: int) -> dict[str, Any]:
    """The 1-minute load as the driver starts timing, and a warning if it looks busy."""
    from analysis.latency import busy_warning

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    warning = busy_warning(load, os.cpu_count() or 1, threads)
    if warning:
        print(f"warning: timing the sweep's models: {warning}", file=sys.stderr, flush=True)
    return {"load_1min": load, "warning": warning}


def finish(
    request: BudgetRequest,
    rows: list[dict[str, Any]],
    baselines: list[dict[str, Any]],
    setup: Any,
    busy: dict[str, Any] | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Write results.json and report.html; a budget nothing met is a UserError naming the
    fastest model found (after both are written)."""
    from analysis.budget import write_budget_report

    settings, out = request.settings, request.out.resolve()
    size = setup.size
    budget = settings.budget_ms
    mark_front(rows, budget)
    mark_front(baselines, budget)
    best = _best(rows)
    results = {
        "format": FORMAT,
        "budget_ms": budget,
        **setup.as_record(),
        "hostname": socket.gethostname(),
        "run_dir": str(request.run_dir.resolve()),
        "trials": rows,
        "baselines": baselines,
        "chosen": export_chosen(best, setup, out) if best else None,
        "best_baseline_within_budget": _best(baselines),
        "fastest": _fastest(rows, baselines),
        "finetune_epochs": {
            "limit": limit,
            "spent": sum(r.get("finetune_epochs") or 0 for r in rows),
        },
        "trial_cpus": sorted({r["cpu"] for r in rows if r.get("cpu")}),
        "driver_timing": busy,  # the machine's load when the driver timed the sweep's models
    }
    write_json(out / RESULTS_FILE, results)
    report = write_budget_report(out)
    print(f"results: {out / RESULTS_FILE}; report: {report}", flush=True)
    if best is None:
        fastest = results["fastest"]
        found = (
            f"the fastest model found is {fastest['name']} ({fastest['arch']}, "
            f"{fastest['pruner']}, sparsity {fastest['sparsity']:g}) at "
            f"{fastest['latency_ms']:.1f} ms"
            if fastest
            else "no model was timed"
        )
        raise UserError(
            f"no searched model runs under {budget:g} ms in {settings.runtime} "
            f"({settings.threads} threads, {size[0]}x{size[1]}): {found}; raise --budget-ms, or "
            "let the preset search higher sparsities (budget.sparsity)"
        )
    return results
