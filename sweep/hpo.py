"""Search of the fine-tuning stage: Optuna proposals, ASHA early stopping, on validation only.

Starts from the pruned checkpoints of a finished sweep (masks fixed), one Tune experiment per
selected combination; the test split is touched once, for the chosen configuration.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sweep import identity
from trainables.checkpoint import write_json, write_text
from trainables.errors import UserError

SPACE_TYPES = ("loguniform", "uniform", "choice", "randint")
SEARCHED = ("max_lr", "base_lr", "momentum", "finetune_epochs", "alpha", "beta", "class_weighting")
CLASS_WEIGHTINGS = ("none", "inverse_sqrt_frequency")


@dataclass(frozen=True)
class SearchConfig:
    samples: int
    grace_period: int
    reduction_factor: float
    seed: int
    space: dict[str, dict[str, Any]]
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    max_concurrent: int = 0

    @classmethod
    def from_preset(cls, preset: dict[str, Any], samples: int | None) -> SearchConfig:
        search = dict(preset.get("search") or {})
        if not search:
            raise UserError("the preset has no 'search' section (use --preset finetune-hpo)")
        allowed = {"samples", "grace_period", "reduction_factor", "seed", "space"}
        unknown = sorted(set(search) - allowed)
        if unknown:
            raise UserError(
                f"unknown search key '{unknown[0]}'; allowed: {', '.join(sorted(allowed))}"
            )
        for name, spec in search.get("space", {}).items():
            if name not in SEARCHED:
                raise UserError(
                    f"search.space.{name}: not searchable; allowed: {', '.join(SEARCHED)}"
                )
            if not isinstance(spec, dict) or spec.get("type") not in SPACE_TYPES:
                raise UserError(
                    f"search.space.{name}: type must be one of {', '.join(SPACE_TYPES)}"
                )
            if name == "class_weighting":
                bad = [v for v in spec.get("values", []) if v not in CLASS_WEIGHTINGS]
                if spec["type"] != "choice" or bad:
                    raise UserError(
                        f"search.space.class_weighting: a choice of {', '.join(CLASS_WEIGHTINGS)}"
                    )
        sweep = preset.get("sweep") or {}
        return cls(
            samples=samples or int(search.get("samples", 20)),
            grace_period=int(search.get("grace_period", 1)),
            reduction_factor=float(search.get("reduction_factor", 3)),
            seed=int(search.get("seed", 0)),
            space=dict(search.get("space", {})),
            cpus_per_trial=float(sweep.get("cpus_per_trial", 1)),
            gpus_per_trial=float(sweep.get("gpus_per_trial", 0)),
            max_concurrent=int(sweep.get("max_concurrent", 0)),
        )

    def max_epochs(self, default: int) -> int:
        spec = self.space.get("finetune_epochs")
        if spec is None:
            return default
        if spec["type"] == "choice":
            return int(max(spec["values"]))
        return int(spec["high"])


def tune_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from ray import tune

    out = {}
    for name, spec in space.items():
        kind = spec["type"]
        if kind == "choice":
            out[name] = tune.choice(list(spec["values"]))
        elif kind == "randint":
            out[name] = tune.randint(int(spec["low"]), int(spec["high"]) + 1)
        else:
            out[name] = getattr(tune, kind)(float(spec["low"]), float(spec["high"]))
    return out


def parse_select(text: str | None) -> dict[str, Any]:
    """`model=fpn,pruner=agp,sparsity=0.9,seed=1` -> the trial-identity fields to match."""
    try:
        return identity.parse_select(text)
    except ValueError as err:
        raise UserError(f"--select {text}: {err}") from None


def _read_final(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None


def pruned_trials(run_dir: Path, select: dict[str, str]) -> list[dict[str, Any]]:
    """Finished pruned trials of a sweep matching the selection."""
    trials_dir = run_dir / "trials"
    if not trials_dir.is_dir():
        raise UserError(f"{run_dir} is not a sweep folder (no trials/); give --from RUN_DIR")
    found = []
    for trial in sorted(trials_dir.iterdir()):
        final, config = trial / "final.json", trial / "config.yaml"
        if not (
            final.exists() and config.exists() and (trial / "checkpoints" / "final.pt").exists()
        ):
            continue
        try:
            cfg = yaml.safe_load(config.read_text())
        except yaml.YAMLError as err:
            raise UserError(f"{config} is not valid YAML: {err}") from None
        who = identity.trial_id(trial.name, cfg)
        if who is None or who.is_dense:
            continue
        if who.matches(select):
            found.append(
                {
                    "name": trial.name,
                    "config": cfg,
                    "dir": str(trial),
                    "final": _read_final(final),
                }
            )
    if not found:
        raise UserError(
            f"no finished pruned trial in {trials_dir} matches --select {select or 'all'}"
        )
    return found


def search_one(
    base: dict[str, Any], search: SearchConfig, out: Path, gpus: float
) -> dict[str, Any]:
    """One Tune experiment for one combination; resumes if it was interrupted."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from trainables.ray_entry import finetune_trial

    out.mkdir(parents=True, exist_ok=True)
    fixed = {
        "base": {
            "name": base["name"],
            "config": base["config"],
            "checkpoint": str(Path(base["dir"]) / "checkpoints" / "final.pt"),
            "out_root": str(out / "trials"),
        }
    }
    trainable = tune.with_resources(finetune_trial, {"cpu": search.cpus_per_trial, "gpu": gpus})
    path = out / "search"
    space = {**fixed, **tune_space(search.space)}
    if tune.Tuner.can_restore(str(path)):
        print(f"[{base['name']}] resuming the search from {path}", flush=True)
        # The same space again, as in the sweep: a search killed before its first trial started
        # leaves no resolved trial configs behind.
        tuner = tune.Tuner.restore(
            str(path), trainable=trainable, resume_errored=True, param_space=space
        )
    else:
        max_t = search.max_epochs(base["config"]["stages"]["finetune_epochs"])
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="val_miou",
                mode="max",
                num_samples=search.samples,
                search_alg=OptunaSearch(seed=search.seed),
                scheduler=ASHAScheduler(
                    max_t=max_t,
                    grace_period=search.grace_period,
                    reduction_factor=search.reduction_factor,
                ),
                max_concurrent_trials=search.max_concurrent or None,
                reuse_actors=True,  # one process per slot, as in the sweep (sweep/tune.py)
            ),
            run_config=tune.RunConfig(
                name="search",
                storage_path=str(out),
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=1),
            ),
        )
    grid = tuner.fit()
    return summarize_search(base, grid, out)


def summarize_search(base: dict[str, Any], grid: Any, out: Path) -> dict[str, Any]:
    """A row per trial, the best on validation, and its single test evaluation."""
    rows = []
    for result in grid:
        if result.metrics is None or "val_miou" not in result.metrics:
            continue
        params = {k: result.config[k] for k in SEARCHED if k in result.config}
        rows.append(
            {
                **params,
                "trial_id": result.metrics.get("trial_id"),
                "val_miou": result.metrics["val_miou"],
                "epochs_run": result.metrics.get("epoch"),
                "achieved_sparsity": result.metrics.get("achieved_sparsity"),
                "error": None if result.error is None else str(result.error).splitlines()[0],
                "out_dir": str(
                    Path(result.config["base"]["out_root"]) / result.metrics["trial_id"]
                ),
            }
        )
    valid = [r for r in rows if r["error"] is None and not math.isnan(r["val_miou"])]
    if not valid:
        raise UserError(f"no search trial for {base['name']} reported a validation mIoU")
    best = max(valid, key=lambda r: r["val_miou"])
    # A search trial that ran all its epochs keeps final.pt; one ASHA stopped keeps last.pt, the
    # model of the epoch it last reported (search trials checkpoint every epoch).
    checkpoints = Path(best["out_dir"]) / "checkpoints"
    final = checkpoints / "final.pt"
    test = test_once(final if final.exists() else checkpoints / "last.pt")
    summary = {
        "combination": base["name"],
        "best": best,
        "tuned_test_miou": test["test_miou"],
        "paper_settings_test_miou": base["final"]["pruned"]["test_miou"],
        "tuned_test": test,
        "trials": len(rows),
    }
    write_json(out / "best.json", summary)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "trials.csv", buf.getvalue())
    return summary


def test_once(checkpoint: Path) -> dict[str, Any]:
    """The chosen configuration's model on the test split: the only time a search touches it."""
    from deploy.artefacts import model_from_checkpoint
    from trainables import engine
    from trainables.data import build_datasets

    model, cfg = model_from_checkpoint(checkpoint)
    data = build_datasets(cfg.data, cfg.seed)
    loader = engine.make_loader(data.test, cfg.optim.batch_size, train=False)
    device = engine.resolve_device(cfg.runtime.device)
    result = engine.evaluate(
        model.to(device), loader, engine.build_loss(cfg.loss).to(device), cfg.data.classes, device
    )
    return {
        "test_miou": result["miou"],
        "test_miou_corrosion": result["miou_corrosion"],
        "test_iou": result["iou"],
    }


def run_search(
    preset: dict[str, Any],
    run_dir: Path,
    select: str | None,
    samples: int | None,
    out: Path,
    address: str | None,
) -> list[dict[str, Any]]:
    from sweep.tune import _init_ray, cluster_gpus_per_trial

    search = SearchConfig.from_preset(preset, samples)
    bases = pruned_trials(run_dir.resolve(), parse_select(select))
    _init_ray(address)
    gpus = cluster_gpus_per_trial(search.gpus_per_trial, address)
    summaries = []
    for base in bases:
        print(f"searching the fine-tuning of {base['name']}: {search.samples} samples", flush=True)
        summary = search_one(base, search, out.resolve() / base["name"], gpus)
        print(
            f"  best on validation {summary['best']['val_miou']:.4f}; test mIoU tuned "
            f"{summary['tuned_test_miou']:.4f} vs paper settings "
            f"{summary['paper_settings_test_miou']:.4f}",
            flush=True,
        )
        summaries.append(summary)
    write_json(out / "summary.json", summaries)
    return summaries
