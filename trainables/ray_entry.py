"""The Ray Tune trainable: one trial spec in, `run_trial` with a reporter that calls tune.report."""

from __future__ import annotations

import math
import os
import traceback
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from trainables.checkpoint import write_text
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
