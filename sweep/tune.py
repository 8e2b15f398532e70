"""The sweep on Ray Tune: stage 1 dense models, stage 2 every pruned combination; resumable."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweep.grid import SweepConfig, TrialSpec, expand
from trainables.checkpoint import write_json, write_text, write_yaml
from trainables.errors import UserError

STAGES = ("stage1-dense", "stage2-prune")


@dataclass(frozen=True)
class SweepRequest:
    preset: str
    sweep: SweepConfig
    template: dict[str, Any]  # raw trial config: the preset's trial section with overrides
    run_dir: Path
    roots: dict[str, str]
    address: str | None = None


def _name(trial: Any) -> str:
    return trial.config.get("trial", {}).get("name", trial.trial_id)


def _progress_callback(stage: str, total: int) -> Any:
    from ray import tune

    class Progress(tune.Callback):
        """One line per finished or failed trial: counts and the best test mIoU so far."""

        def __init__(self) -> None:
            self.done = self.failed = 0
            self.best: tuple[float, str] | None = None
            self.started = time.monotonic()

        def _line(self, trials: list, event: str) -> None:
            running = sum(t.status == "RUNNING" for t in trials)
            best = f"best test mIoU {self.best[0]:.4f} ({self.best[1]})" if self.best else ""
            elapsed = time.monotonic() - self.started
            print(
                f"[{stage} {elapsed:6.0f}s] {event:<40} done {self.done}/{total} running "
                f"{running} failed {self.failed}  {best}",
                flush=True,
            )

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if result.get("final") and result.get("test_miou") is not None:
                score = float(result["test_miou"])
                if self.best is None or score > self.best[0]:
                    self.best = (score, _name(trial))

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.done += 1
            self._line(trials, f"finished {_name(trial)}")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.failed += 1
            self._line(trials, f"FAILED {_name(trial)}")

    return Progress()


def run_stage(
    name: str,
    specs: list[dict[str, Any]],
    run_dir: Path,
    sweep: SweepConfig,
    gpus: float,
) -> dict[str, str | None]:
    """Fit (or resume) one Tune experiment; trial name -> None if finished, else the error."""
    from ray import tune

    from trainables.ray_entry import train_trial

    if not specs:
        return {}
    trainable = tune.with_resources(train_trial, {"cpu": sweep.cpus_per_trial, "gpu": gpus})
    path = run_dir / name
    space = {"trial": tune.grid_search(specs)}
    if tune.Tuner.can_restore(str(path)):
        print(f"[{name}] resuming the unfinished stage from {path}", flush=True)
        # The same space again: a driver killed before its first trial started leaves no
        # resolved trial configs behind.
        tuner = tune.Tuner.restore(
            str(path), trainable=trainable, resume_errored=True, param_space=space
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent or None),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(run_dir),
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                callbacks=[_progress_callback(name, len(specs))],
                verbose=0,
            ),
        )
    grid = tuner.fit()
    outcome: dict[str, str | None] = {}
    for result in grid:
        trial_name = result.config.get("trial", {}).get("name")
        if trial_name is None:
            continue
        outcome[trial_name] = None if result.error is None else str(result.error).splitlines()[0]
    for spec in specs:  # trials Tune never reported (e.g. a stage restored mid-way)
        if spec["name"] not in outcome:
            final = Path(spec["out_dir"]) / "final.json"
            outcome[spec["name"]] = None if final.exists() else "did not run"
    return outcome


def _gpus_per_trial(requested: float) -> float:
    import ray

    available = ray.cluster_resources().get("GPU", 0.0)
    if requested > 0 and available == 0:
        print(
            f"warning: no GPU in the Ray cluster: running trials with 0 GPUs instead of {requested}",
            file=sys.stderr,
            flush=True,
        )
        return 0.0
    return requested


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)


def run_sweep(request: SweepRequest) -> dict[str, Any]:
    """Both stages; a failed base model drops only its own combinations. Returns the status."""
    run_dir = request.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    dense, pruned = expand(request.sweep, request.template, run_dir, request.roots)
    _write_sweep_file(request, run_dir)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    _init_ray(request.address)
    gpus = _gpus_per_trial(request.sweep.gpus_per_trial)
    print(
        f"sweep '{request.preset}': {len(dense)} dense + {len(pruned)} pruned trials in {run_dir}",
        flush=True,
    )
    stage1 = run_stage(STAGES[0], [s.as_param() for s in dense], run_dir, request.sweep, gpus)
    write_label_distribution(run_dir, dense)
    failed_bases = {name: err for name, err in stage1.items() if err}
    runnable = [s for s in pruned if s.base not in failed_bases]
    dropped = [s.name for s in pruned if s.base in failed_bases]
    for base, err in failed_bases.items():
        print(
            f"base model {base} failed ({err}); dropping its "
            f"{sum(s.base == base for s in pruned)} combinations",
            flush=True,
        )
    stage2 = run_stage(STAGES[1], [s.as_param() for s in runnable], run_dir, request.sweep, gpus)
    status = {
        "preset": request.preset,
        "dense": stage1,
        "pruned": stage2,
        "failed_base_models": [{"trial": b, "reason": e} for b, e in failed_bases.items()],
        "dropped_combinations": dropped,
    }
    write_json(run_dir / "sweep_status.json", status)
    print(summary(run_dir, dense + pruned, status), flush=True)
    return status


def write_label_distribution(run_dir: Path, dense: list[TrialSpec]) -> None:
    """Per-class pixel shares of every dataset's splits (the paper's Figure 4), for the report."""
    import pandas as pd

    from trainables.config import TrialConfig
    from trainables.data import synthetic_root
    from trainables.data.check import class_distribution

    tables = []
    for dataset in dict.fromkeys(spec.config["data"]["dataset"] for spec in dense):
        spec = next(s for s in dense if s.config["data"]["dataset"] == dataset)
        data = TrialConfig.from_dict(spec.config).data
        root = synthetic_root(data) if dataset == "synthetic" else Path(data.root)
        if not root.is_dir():
            continue  # no trial got as far as generating or reading it
        fmt = "sscs" if dataset == "sscs" else "nea" if dataset == "nea" else "folder"
        table = class_distribution(
            root, fmt, sscs_variant=data.sscs_variant, num_classes=data.classes
        )
        tables.append(table.assign(dataset=dataset))
    if tables:
        csv = pd.concat(tables)[["dataset", "split", "class_id", "class_name", "pixels", "percent"]]
        write_text(run_dir / "label_distribution.csv", csv.to_csv(index=False))


def _write_sweep_file(request: SweepRequest, run_dir: Path) -> None:
    from dataclasses import asdict

    resolved = {
        "preset": request.preset,
        "sweep": {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(request.sweep).items()
        },
        "trial": request.template,
        "data_roots": request.roots,
    }
    path = run_dir / "sweep.yaml"
    if path.exists():
        import yaml

        existing = yaml.safe_load(path.read_text())
        if existing != json.loads(json.dumps(resolved)):
            raise UserError(
                f"{run_dir} holds a sweep with other settings ({path}); rerun with the same "
                "command to resume it, or choose a new --out"
            )
    write_yaml(path, json.loads(json.dumps(resolved)))


def summary(run_dir: Path, specs: list[TrialSpec], status: dict[str, Any]) -> str:
    rows = []
    baseline = None
    for spec in specs:
        final = Path(spec.out_dir) / "final.json"
        if not final.exists():
            rows.append(f"  {spec.name:<40} not finished")
            continue
        result = json.loads(final.read_text())
        baseline = result["dense"].get("test_all_background_miou", baseline)
        dense = result["dense"]["test_miou"]
        pruned = result["pruned"]["test_miou"] if result.get("pruned") else None
        text = f"dense {dense:.4f}"
        if pruned is not None:
            text += f"  pruned {pruned:.4f} at sparsity {result['achieved_sparsity']:.2f}"
        rows.append(f"  {spec.name:<40} {text}")
    finished = sum(err is None for stage in ("dense", "pruned") for err in status[stage].values())
    total = len(specs)
    lines = [f"test mIoU per trial ({finished}/{total} finished):", *rows]
    if baseline is not None:
        lines.append(f"predicting all background would score test mIoU {baseline:.4f}")
    return "\n".join([*lines, f"results in {run_dir}"])
