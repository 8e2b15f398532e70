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
from trainables.provenance import code_version

STAGES = ("stage1-dense", "stage2-prune")


@dataclass(frozen=True)
class SweepRequest:
    preset: str
    sweep: SweepConfig
    template: dict[str, Any]  # raw trial config: the preset's trial section with overrides
    run_dir: Path
    roots: dict[str, str]
    address: str | None = None
    check_data: bool = True  # validate every dataset in the driver before any trial starts
    mlflow: str | None = None  # MLflow tracking URI (sweep/tracking.py)
    tensorboard: bool = True  # event files in RUN_DIR/tensorboard (sweep/tracking.py)


def _name(trial: Any) -> str:
    return trial.config.get("trial", {}).get("name", trial.trial_id)


def _progress_callback(stage: str, total: int, earlier: int) -> Any:
    from ray import tune

    class Progress(tune.Callback):
        """One line per finished or failed trial: counts over the whole stage (trials finished
        by an earlier run of the sweep included), time since this run began, best test mIoU."""

        def __init__(self) -> None:
            self.done, self.failed = earlier, 0
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


def _finished(spec: dict[str, Any]) -> bool:
    return (Path(spec["out_dir"]) / "final.json").exists()


def _needs_int8(spec: dict[str, Any]) -> bool:
    from sweep.deploy_step import needs_int8

    return needs_int8(Path(spec["out_dir"]))


def train_and_deploy(config: dict[str, Any]) -> None:
    """Ray entry of a sweep with `deploy_int8`: the trial (one finished earlier returns at
    once), then its INT8 record on the same node (sweep/deploy_step.py). The INT8 step never
    fails the trial: a refused export is recorded, and any other failure is a warning, tried
    again by the next run of the sweep."""
    from sweep.deploy_step import REFUSED, deploy_int8
    from trainables.ray_entry import train_trial

    train_trial(config)
    out_dir = Path(config["trial"]["out_dir"])
    try:
        record = deploy_int8(out_dir)
    except Exception as err:  # noqa: BLE001 - the trial's results stand whatever happens here
        print(
            f"warning: the INT8 step of {out_dir.name} failed ({type(err).__name__}: {err}); "
            "run the sweep again to retry it",
            file=sys.stderr,
            flush=True,
        )
        return
    if record["status"] == REFUSED:
        print(f"INT8 export of {out_dir.name} refused: {record['reason']}", flush=True)


def run_stage(
    name: str,
    specs: list[dict[str, Any]],
    run_dir: Path,
    sweep: SweepConfig,
    gpus: float,
    callbacks: list[Any] | None = None,  # more Tune callbacks (sweep/tracking.py)
) -> dict[str, str | None]:
    """Run every trial of `specs` not finished yet; trial name -> None if finished, else the error.

    Each call is a fresh Tune experiment over the unfinished trials, with the resources given
    now: a trial resumes from its own `checkpoints/last.pt`, so nothing is lost, a combination
    whose base model appeared since the last run is included, and Ray's pickled experiment state
    from an earlier run is never loaded (`Tuner.restore` would unpickle it and ignore new grid
    points and new resources).
    """
    from ray import tune

    from trainables.ray_entry import train_trial

    outcome: dict[str, str | None] = {s["name"]: None for s in specs if _finished(s)}
    pending = [s for s in specs if not _finished(s)]
    # Finished trials without their INT8 record (`deploy_int8` newly on): the same trainable
    # finds the trial done and makes only the record, on a node like the one that ran it.
    to_deploy = [s for s in specs if sweep.deploy_int8 and _needs_int8(s)]
    if specs:
        deploy = f", {len(to_deploy)} finished to deploy as INT8" if to_deploy else ""
        print(
            f"[{name}] {len(specs)} trials: {len(outcome)} finished earlier, {len(pending)} to "
            f"run{deploy}",
            flush=True,
        )
    if not pending and not to_deploy:
        return outcome
    entry = train_and_deploy if sweep.deploy_int8 else train_trial
    trainable = tune.with_resources(entry, {"cpu": sweep.cpus_per_trial, "gpu": gpus})
    earlier = len(outcome) - len(to_deploy)  # finished with nothing left to do
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(pending + to_deploy)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=sweep.max_concurrent or None,
            # A finished trial's process takes the next trial (same resources): torch, smp and
            # timm (about 10 s of imports per process on a small CPU) are imported once per slot.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(run_dir),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            callbacks=[_progress_callback(name, len(specs), earlier), *(callbacks or [])],
            verbose=0,
        ),
    )
    for result in tuner.fit():
        trial_name = result.config.get("trial", {}).get("name")
        if trial_name is not None and trial_name not in outcome:  # finished earlier: it stands
            outcome[trial_name] = None if result.error is None else _first_line(result.error)
    for spec in pending:  # trials Tune never reported
        if spec["name"] not in outcome:
            outcome[spec["name"]] = None if _finished(spec) else "did not run"
    return outcome


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def gpus_per_trial(requested: float, gpus_now: float, can_add_gpus: bool | None) -> float:
    """The GPUs each trial asks for. `can_add_gpus`: True if the cluster's autoscaler has node
    types with GPUs, False if nothing can ever add one (a machine without GPUs, a cluster
    without an autoscaler or whose node types have none), None if it autoscales but its node
    types are unknown here. Only False turns a request into 0: asking for a GPU is what makes an
    autoscaler launch one."""
    if requested == 0 or gpus_now > 0 or can_add_gpus is not False:
        return requested
    print(
        f"warning: no GPU in the Ray cluster and nothing to add one: running trials with 0 GPUs "
        f"instead of {requested} (pass --gpus-per-trial 0 to silence this)",
        file=sys.stderr,
        flush=True,
    )
    return 0.0


def cluster_gpus_per_trial(requested: float, address: str | None) -> float:
    """`gpus_per_trial` for the Ray this driver is connected to (a local one when no address)."""
    import ray

    can_add = False if address is None else _cluster_can_add_gpus()
    return gpus_per_trial(requested, ray.cluster_resources().get("GPU", 0.0), can_add)


def _cluster_can_add_gpus() -> bool | None:
    """Whether an autoscaler could add GPU nodes to the connected cluster (see `gpus_per_trial`)."""
    import yaml

    # The cluster launcher leaves the autoscaler's config on the head (Ray Tune reads it too).
    bootstrap = Path("~/ray_bootstrap_config.yaml").expanduser()
    if bootstrap.is_file():
        types = (yaml.safe_load(bootstrap.read_text()) or {}).get("available_node_types") or {}
        return any(
            (t.get("resources") or {}).get("GPU", 0) > 0 and t.get("max_workers", 1) != 0
            for t in types.values()
        )
    return None if _autoscaler_running() else False


def _autoscaler_running() -> bool:
    """An autoscaler reports to this cluster's GCS (v1 writes its status there; v2 sets a flag)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    if _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS):
        return True
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        return is_autoscaler_v2(fetch_from_server=True)
    except Exception:  # noqa: BLE001 - no v2 state in this cluster
        return False


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:  # a Ray of its own, even where `ray start` left one running (it has its own --address)
        ray.init(
            address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False
        )


def trial_environment() -> dict[str, str]:
    """Variables every trial sets, made absolute here: a trial runs in a folder Ray chose."""
    env = {}
    if os.environ.get("CORROPRUNE_CACHE"):
        env["CORROPRUNE_CACHE"] = str(Path(os.environ["CORROPRUNE_CACHE"]).expanduser().resolve())
    return env


def run_sweep(request: SweepRequest) -> dict[str, Any]:
    """Both stages; a failed base model drops only its own combinations. Returns the status."""
    from sweep.tracking import open_tracking

    run_dir = request.run_dir.resolve()
    dense, pruned = expand(request.sweep, request.template, run_dir, request.roots)
    resolved = _check_run_dir(request, run_dir)  # before anything is written
    if request.check_data:
        check_datasets(dense)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_yaml(run_dir / "sweep.yaml", resolved)
    tracker = open_tracking(run_dir, request.mlflow, request.tensorboard)  # MLflow, TensorBoard
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    _init_ray(request.address)
    gpus = cluster_gpus_per_trial(request.sweep.gpus_per_trial, request.address)
    print(
        f"sweep '{request.preset}': {len(dense)} dense + {len(pruned)} pruned trials in {run_dir}",
        flush=True,
    )
    extra = {"code_version": code_version(), "env": trial_environment()}
    stage1 = run_stage(
        STAGES[0],
        [{**s.as_param(), **extra} for s in dense],
        run_dir,
        request.sweep,
        gpus,
        tracker.callbacks(),
    )
    write_label_distribution(run_dir, dense)
    failed_bases = {name: err for name, err in stage1.items() if err}
    runnable = [s for s in pruned if s.base not in failed_bases]
    dropped = [s.name for s in pruned if s.base in failed_bases]
    for base, err in failed_bases.items():
        print(
            f"base model {base} failed ({err}); dropping its "
            f"{sum(s.base == base for s in pruned)} combinations (they run once it finishes: "
            "run the same command again)",
            flush=True,
        )
    stage2 = run_stage(
        STAGES[1],
        [{**s.as_param(), **extra} for s in runnable],
        run_dir,
        request.sweep,
        gpus,
        tracker.callbacks(),
    )
    status = {
        "preset": request.preset,
        "dense": stage1,
        "pruned": stage2,
        "failed_base_models": [{"trial": b, "reason": e} for b, e in failed_bases.items()],
        "dropped_combinations": dropped,
    }
    write_json(run_dir / "sweep_status.json", status)
    print(summary(run_dir, dense + pruned, status), flush=True)
    tracker.finish()  # every trial folder synced, the MLflow parent run finished
    return status


def check_datasets(dense: list[TrialSpec]) -> None:
    """Every bad file of every dataset the sweep reads, named before the first trial starts."""
    from trainables.config import TrialConfig
    from trainables.data.check import check_dataset

    bad = 0
    for dataset in dict.fromkeys(spec.config["data"]["dataset"] for spec in dense):
        if dataset == "synthetic":
            continue  # generated by the trials themselves
        spec = next(s for s in dense if s.config["data"]["dataset"] == dataset)
        data = TrialConfig.from_dict(spec.config).data
        print(f"checking dataset '{dataset}' in {data.root} ...", flush=True)
        problems = check_dataset(
            Path(data.root), dataset, sscs_variant=data.sscs_variant, num_classes=data.classes
        )
        for problem in problems:
            print(f"{problem.path}: {problem.reason}", file=sys.stderr, flush=True)
        bad += len(problems)
    if bad:
        raise UserError(
            f"{bad} bad file(s) listed above; no trial was started. Fix them, or rerun with "
            "--skip-data-check to let the trials meet them"
        )


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


# Settings that change how trials are scheduled, never what they compute: a resumed sweep may
# change them (after an out-of-memory at 0.5 GPU per trial, resume with 1).
RESOURCE_KEYS = ("cpus_per_trial", "gpus_per_trial", "max_concurrent", "max_failures")
# Settings that add records beside a trial's results, never change them: a resumed sweep may
# switch them on (finished trials get the missing records) or off (what is there stays).
RECORD_KEYS = ("deploy_int8",)


def _resolved_sweep_file(request: SweepRequest) -> dict[str, Any]:
    from dataclasses import asdict

    resolved = {
        "preset": request.preset,
        "sweep": {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(request.sweep).items()
        },
        "trial": request.template,
        "data_roots": request.roots,
        "code_version": code_version(),
    }
    return json.loads(json.dumps(resolved))


def _seeds(resolved: dict[str, Any]) -> list[int]:
    seeds = (resolved.get("sweep") or {}).get("seeds")
    return list(seeds) if seeds is not None else [(resolved.get("trial") or {}).get("seed", 0)]


def _results_part(resolved: dict[str, Any]) -> dict[str, Any]:
    skip = (*RESOURCE_KEYS, *RECORD_KEYS, "seeds")  # seeds are compared apart: may be added
    sweep = {k: v for k, v in (resolved.get("sweep") or {}).items() if k not in skip}
    rest = {k: v for k, v in resolved.items() if k not in ("sweep", "code_version")}
    return {**rest, "sweep": sweep}


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = dict.fromkeys([*old, *new])
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{where}{k}.")]
    return [] if old == new else [f"{where.rstrip('.')} ({old!r} -> {new!r})"]


def _check_run_dir(request: SweepRequest, run_dir: Path) -> dict[str, Any]:
    """The sweep file to write; refuses a RUN_DIR holding another sweep or another code version.

    Only what changes results is compared: resources (`RESOURCE_KEYS`) and added records
    (`RECORD_KEYS`) may differ on resume, and seeds may be added (each new seed trains its own
    bases and combinations).
    """
    import yaml

    resolved = _resolved_sweep_file(request)
    path = run_dir / "sweep.yaml"
    if not path.exists():
        return resolved
    existing = yaml.safe_load(path.read_text()) or {}
    changed = _differences(_results_part(existing), _results_part(resolved))
    dropped_seeds = [s for s in _seeds(existing) if s not in _seeds(resolved)]
    if dropped_seeds:
        changed.append(
            f"sweep.seeds ({_seeds(existing)} -> {_seeds(resolved)}: seeds may be added, "
            f"not removed; missing {dropped_seeds})"
        )
    if changed:
        raise UserError(
            f"{run_dir} holds a sweep with other settings ({path}): {'; '.join(changed[:5])}. "
            "Rerun with the same settings to resume it (resources may change), or choose a new --out"
        )
    recorded = existing.get("code_version")
    if recorded is None:
        print(
            f"warning: {path} records no code version (written by an older corroprune); "
            f"resuming with {resolved['code_version']}",
            file=sys.stderr,
            flush=True,
        )
    elif recorded != resolved["code_version"]:
        raise UserError(
            f"{run_dir} was written by corroprune {recorded} and this is {resolved['code_version']}: "
            "one RUN_DIR holds the results of one code version. Install the recorded version to "
            "resume it, or choose a new --out"
        )
    return resolved


def _int8_text(trial_dir: Path) -> str:
    """The trial's INT8 test mIoU for the summary ("" without a record)."""
    from sweep.deploy_step import REFUSED, read_record

    record = read_record(trial_dir)
    if record is None:
        return ""
    return "  INT8 refused" if record["status"] == REFUSED else f"  INT8 {record['test_miou']:.4f}"


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
        rows.append(f"  {spec.name:<40} {text}{_int8_text(Path(spec.out_dir))}")
    finished = sum(err is None for stage in ("dense", "pruned") for err in status[stage].values())
    total = len(specs)
    lines = [f"test mIoU per trial ({finished}/{total} finished):", *rows]
    if baseline is not None:
        lines.append(f"predicting all background would score test mIoU {baseline:.4f}")
    return "\n".join([*lines, f"results in {run_dir}"])
