"""The Ray Tune trainable: one trial spec in, `run_trial` with a reporter that calls tune.report."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from trainables.checkpoint import read_jsonl, write_text
from trainables.config import TrialConfig
from trainables.errors import UserError
from trainables.provenance import code_version
from trainables.trial import run_trial


def _scalars(record: dict[str, Any]) -> dict[str, Any]:
    """Tune wants flat scalars: lists become one key per item; NaN stays NaN."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, list):
            out.update({f"{key}_{i}": v for i, v in enumerate(value)})
        elif isinstance(value, bool | int | float | str) or value is None:
            out[key] = value
    return out


def _report(record: dict[str, Any]) -> None:
    tune.report(_scalars(record))


def check_code_version(expected: str | None, node: str) -> None:
    """Refuse to run a trial with other code than the sweep's driver (a node set up apart)."""
    if expected is not None and expected != code_version():
        raise UserError(
            f"node {node} runs corroprune {code_version()} but the sweep's driver runs {expected}: "
            "every node of a sweep must run the same code (reinstall it on that node; "
            "`ray up cluster.yaml` syncs and installs the driver's copy)"
        )


def train_trial(config: dict[str, Any]) -> None:
    """Ray entry: `config["trial"]` is a `TrialSpec.as_param()` dict plus the driver's
    `code_version` and `env` (variables with absolute paths)."""
    spec = config["trial"]
    os.environ.update(spec.get("env") or {})
    cfg = TrialConfig.from_dict(spec["config"])
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, math.floor(cpus)))
    context = ray.get_runtime_context()
    meta = {
        "node_ip": ray.util.get_node_ip_address(),
        "node_id": context.get_node_id(),
        "trial_id": tune.get_context().get_trial_id(),
        "trial_cpus": cpus,
        "trial_gpus": context.get_assigned_resources().get("GPU", 0.0),
    }
    warm = Path(spec["warm_start"]) if spec.get("warm_start") else None
    try:
        check_code_version(spec.get("code_version"), meta["node_ip"])
        run_trial(
            cfg,
            out_dir,
            warm_start=warm,
            reporter=_report,
            meta=meta,
        )
    except BaseException as err:
        write_text(
            out_dir / "error.txt", f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}"
        )
        raise
    (out_dir / "error.txt").unlink(missing_ok=True)


def class_weights_from_frequencies(cfg: TrialConfig) -> list[float]:
    """1/sqrt(pixel share) per class over the training split, normalised to mean 1."""
    import numpy as np

    from trainables.data import build_datasets

    data = build_datasets(cfg.data, cfg.seed)
    counts = np.zeros(cfg.data.classes)
    for i in range(len(data.train)):
        mask = data.train.raw(i)[1]
        counts += np.bincount(mask.ravel(), minlength=cfg.data.classes)[: cfg.data.classes]
    weights = 1.0 / np.sqrt(np.maximum(counts / counts.sum(), 1e-6))
    return (weights / weights.mean()).round(4).tolist()


def searched_config(base: dict[str, Any], params: dict[str, Any]) -> TrialConfig:
    """The base trial's config with the searched fine-tuning settings applied."""
    cfg = TrialConfig.from_dict(base)
    optim = {k: params[k] for k in ("max_lr", "base_lr", "momentum") if k in params}
    if "max_lr" in optim or "base_lr" in optim:
        top = optim.get("max_lr", cfg.optim.max_lr)
        optim["base_lr"] = min(optim.get("base_lr", cfg.optim.base_lr), top)
    loss = {k: params[k] for k in ("alpha", "beta") if k in params}
    if params.get("class_weighting", "none") == "inverse_sqrt_frequency":
        loss["class_weights"] = class_weights_from_frequencies(cfg)
    stages = (
        {"finetune_epochs": int(params["finetune_epochs"])} if "finetune_epochs" in params else {}
    )
    # Every epoch: ASHA may stop a trial after any report, and its last.pt is what gets evaluated.
    runtime = {"checkpoint_every_epochs": 1}
    return cfg.replace(optim=optim, loss=loss, stages=stages, runtime=runtime)


def finetune_trial(config: dict[str, Any]) -> None:
    """Ray entry of the fine-tuning search: only the fine-tune stage, from a pruned checkpoint,
    reporting validation metrics every epoch; the test split is not touched here."""
    base = config["base"]
    cfg = searched_config(base["config"], config)
    trial_id = tune.get_context().get_trial_id()
    out_dir = Path(base["out_root"]) / trial_id
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, math.floor(cpus)))

    def report(record: dict[str, Any]) -> None:
        tune.report({**_scalars(record), "trial_id": trial_id})

    run_trial(
        cfg,
        out_dir,
        warm_start=Path(base["checkpoint"]),
        reporter=report,
        meta={"trial_id": trial_id, "node_ip": ray.util.get_node_ip_address()},
        finetune_only=True,
        evaluate_test=False,
    )


# ---- the budget search (sweep/budget.py) --------------------------------------------------------

RATIO = "ratio_"  # search-space key prefix of a stage's channel ratio (sweep/budget.py)
LATENCY_FILE = "latency.json"


class OverBudget(Exception):
    """The trial's slim model is clearly over the latency budget: no fine-tuning."""


def budget_config(base: dict[str, Any], params: dict[str, Any], stages: list[str]) -> TrialConfig:
    """A sweep trial's config pruning coupled channels with the searched pruner, sparsity and
    per-stage channel ratios, fine-tuned slim, with no in-trial latency timing (the search times
    the model itself)."""
    ratios = {s: float(params[RATIO + s]) for s in stages if RATIO + s in params}
    cfg = TrialConfig.from_dict(base)
    return cfg.replace(
        pruning={
            "pruner": params["pruner"],
            "sparsity": float(params["sparsity"]),
            "granularity": "coupled",
            "scope": "layer",
            "stage_ratios": ratios or None,
            "slim_finetune": True,
        },
        runtime={"latency_repeats": 0},
    )


class QuietRoomClient:
    """A trial's side of the search's quiet room (sweep/budget.py `QuietRoom`)."""

    def __init__(self, name: str, who: str, timeout: float) -> None:
        self.actor = ray.get_actor(name, namespace="corroprune")
        self.who, self.timeout = who, timeout

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        ray.get(self.actor.enter_training.remote(self.who, self.timeout))
        try:
            yield
        finally:
            ray.get(self.actor.leave_training.remote(self.who))

    @contextlib.contextmanager
    def measuring(self) -> Iterator[bool]:
        quiet = ray.get(self.actor.enter_measuring.remote(self.who, self.timeout))
        try:
            yield quiet
        finally:
            ray.get(self.actor.leave_measuring.remote(self.who))


def measure_slim(
    model: torch.nn.Module, cfg: TrialConfig, setup: Any, folder: Path, room: QuietRoomClient
) -> dict[str, Any]:
    """The slim model's latency: exported (ONNX runtimes) beside the others, timed alone."""
    from deploy.timing import parameter_count, prepare, time_rounds

    runner = prepare(copy.deepcopy(model), cfg, setup, folder)
    waited = time.monotonic()
    with room.measuring() as quiet:
        started = time.monotonic()
        timing = time_rounds({"slim": runner}, setup)["slim"]
    return {
        **timing,
        **setup.as_record(),
        "quiet": quiet,
        "waited_s": round(started - waited, 3),
        "params": parameter_count(model),
    }


OBJECTIVE = "objective_latency_ms"  # the latency Optuna ranks: measured, floored at the budget


def objective_latency(latency_ms: float, floor_ms: float) -> float:
    """What Optuna is told of a latency: with `budget.latency_floor`, under the budget counts as
    the budget (all models under it tie on latency and rank by validation mIoU)."""
    return latency_ms if math.isnan(latency_ms) else max(latency_ms, floor_ms)


def _budget_result(out_dir: Path, status: str, trial_id: str) -> dict[str, Any]:
    """The trial's last report: both objectives and what the search's table shows."""
    latency = json.loads((out_dir / LATENCY_FILE).read_text())
    records = [r for r in read_jsonl(out_dir / "metrics.jsonl") if "val_miou" in r]
    last = records[-1] if records else {}
    return {
        "trial_id": trial_id,
        "status": status,
        "val_miou": last.get("val_miou", math.nan),
        "achieved_sparsity": last.get("achieved_sparsity", math.nan),
        "epochs": len(records),
        "finetune_epochs": sum(r.get("stage") == "finetune" for r in records),
        **{k: latency[k] for k in ("latency_ms", "latency_p90_ms", "quiet", "params", "cpu")},
    }


def run_budget_trial(
    cfg: TrialConfig,
    out_dir: Path,
    dense: Path,
    setup: Any,
    limit_ms: float,
    room: Any,
    reporter: Any = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One budget-search configuration, Ray aside: prune from the dense checkpoint, time the slim
    model once (`room`: `training()` and `measuring()` context managers), stop before
    fine-tuning if it is over `limit_ms`, else fine-tune. Returns the search's result record."""
    from trainables.checkpoint import write_json
    from trainables.trial import TrialCallbacks

    def after_cut(model: torch.nn.Module) -> None:
        path = out_dir / LATENCY_FILE
        if not path.exists():  # measured once; a resumed trial reads it back
            write_json(path, measure_slim(model, cfg, setup, out_dir / "deploy", room))
        if json.loads(path.read_text())["latency_ms"] > limit_ms:
            raise OverBudget

    status = "finished"
    try:
        run_trial(
            cfg,
            out_dir,
            warm_start=dense,
            reporter=reporter,
            meta=meta or {"trial_id": out_dir.name},
            evaluate_test=False,
            callbacks=TrialCallbacks(epoch=room.training, after_cut=after_cut),
        )
    except OverBudget:
        status = "over_budget"
    return _budget_result(out_dir, status, out_dir.name)


def budget_trial(config: dict[str, Any]) -> None:
    """Ray entry of the budget search (`run_budget_trial` in the search's quiet room); the last
    report carries both objectives (validation mIoU, latency)."""
    from deploy.timing import TimingSetup

    search = config["search"]
    os.environ.update(search.get("env") or {})
    base = search["bases"][config["arch"]]
    cfg = budget_config(base["config"], config, base["stages"])
    trial_id = tune.get_context().get_trial_id()
    out_dir = Path(search["out_root"]) / trial_id
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, math.floor(cpus)))
    timing = search["timing"]
    setup = TimingSetup(
        timing["runtime"], tuple(timing["size"]), timing["threads"], timing["repeats"]
    )

    def report(record: dict[str, Any]) -> None:
        # Every report names both objectives (Tune checks); latency is NaN until measured.
        path = out_dir / LATENCY_FILE
        latency = json.loads(path.read_text())["latency_ms"] if path.exists() else math.nan
        tune.report({**_scalars(record), "trial_id": trial_id, **objectives(latency)})

    def objectives(latency: float) -> dict[str, float]:
        return {"latency_ms": latency, OBJECTIVE: objective_latency(latency, search["floor_ms"])}

    try:
        node_ip = ray.util.get_node_ip_address()
        check_code_version(search.get("code_version"), node_ip)
        room = QuietRoomClient(search["room"], trial_id, search["quiet_timeout_s"])
        result = run_budget_trial(
            cfg,
            out_dir,
            Path(base["checkpoint"]),
            setup,
            search["limit_ms"],
            room,
            report,
            {"trial_id": trial_id, "node_ip": node_ip, "trial_cpus": cpus},
        )
    except BaseException as err:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(
            out_dir / "error.txt", f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}"
        )
        raise
    tune.report({**result, **objectives(result["latency_ms"])})
