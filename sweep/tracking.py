"""Experiment tracking from the sweep's driver: trial folders mirrored into MLflow and TensorBoard.

Everything is read from the files the trials write (config.yaml, env.json, metrics.jsonl,
final.json, error.txt), never from Tune's results, so the same code syncs a sweep as it runs
(`Tracker`, through one Tune callback) and a finished RUN_DIR after the fact (`log_run`,
`write_tensorboard`, `corroprune track`). Only the driver writes: trials never open the MLflow
database or an event file, so one SQLite file never sees concurrent writers.

Both mirrors are resumable and never duplicate a step. Each remembers how many metrics.jsonl
records it holds and a digest of them (an MLflow tag, a small file beside the event files). A
sync writes only the records after those; if the file no longer starts with them (a trial that
crashed after an epoch's record but before its checkpoint re-runs that epoch on resume, with
other values), the trial's mirror is written again from scratch.

Ray's own `MLflowLoggerCallback` and `TBXLoggerCallback` log Tune's results under Ray's trial
folder names and log again what a resumed trial re-reports; hence this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from analysis.collect import column_name
from sweep.identity import trial_id
from trainables.checkpoint import read_jsonl, write_text
from trainables.errors import UserError

EXPERIMENT = "corroprune"  # the MLflow experiment, unless MLFLOW_EXPERIMENT_NAME names another
MLFLOW_MISSING = "--mlflow needs the mlflow extra: pip install 'corroprune[mlflow]'"
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores
SERVER_SCHEMES = ("http", "https", "databricks")
RUN_TAG = "corroprune.run_dir"  # the parent run of a RUN_DIR: its absolute path
TRIAL_TAG = "corroprune.trial"  # a nested run: its trial's name
SYNCED_TAG = "corroprune.synced"  # a nested run: `digest` of the metrics.jsonl records it holds
FINAL_TAG = "corroprune.final"  # a nested run: final.json's metrics are logged
PARENT_TAG = "mlflow.parentRunId"
RUN_STATUS = {"finished": "FINISHED", "errored": "FAILED", "running": "RUNNING"}
TENSORBOARD = "tensorboard"  # RUN_DIR/tensorboard/<trial name>/events.out.tfevents...
TB_SYNCED = ".corroprune-synced"  # beside the event files: `digest` of the records they hold
BATCH_METRICS = 500  # a log_batch call takes records up to this many (MLflow's limit: 1000)
MAX_PARAMS = 100  # params or tags per MLflow log_batch call


# ---- what a trial folder holds --------------------------------------------------------------


@dataclass(frozen=True)
class TrialFolder:
    """One trial folder as tracking sees it."""

    name: str
    identity: dict[str, Any]  # dataset, model, encoder, pruner, granularity, target_sparsity, seed
    status: str  # finished (final.json), errored (error.txt), running (neither)
    config: dict[str, Any]
    env: dict[str, Any]
    final: dict[str, Any] | None
    error: str | None  # error.txt's first line
    records: list[dict[str, Any]]  # metrics.jsonl, a torn last line dropped


def _load(path: Path, parse: Any) -> Any:
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def read_trial(trial_dir: Path) -> TrialFolder:
    config = _load(trial_dir / "config.yaml", yaml.safe_load) or {}
    final = _load(trial_dir / "final.json", json.loads)
    error = _load(trial_dir / "error.txt", str)
    error = next((line.strip() for line in (error or "").splitlines() if line.strip()), None)
    identity = trial_id(trial_dir.name, config)
    return TrialFolder(
        name=trial_dir.name,
        identity=identity.columns() if identity else {},
        status="finished" if final is not None else "errored" if error else "running",
        config=config,
        env=_load(trial_dir / "env.json", json.loads) or {},
        final=final,
        error=error,
        records=read_jsonl(trial_dir / "metrics.jsonl"),
    )


def trial_folders(run_dir: Path) -> list[Path]:
    trials = Path(run_dir) / "trials"
    return sorted(p for p in trials.iterdir() if p.is_dir()) if trials.is_dir() else []


# ---- pure pieces ----------------------------------------------------------------------------


def digest(records: list[dict[str, Any]]) -> str:
    """`<count>:<hash>` of a list of records: what a mirror holds."""
    text = json.dumps(records, sort_keys=True, allow_nan=True)
    return f"{len(records)}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def resume_at(records: list[dict[str, Any]], synced: str | None) -> int | None:
    """How many of `records` a mirror holding `synced` already has; None when `records` no
    longer start with what it holds (the mirror must be written again)."""
    if not synced:
        return 0
    count = synced.partition(":")[0]
    if not count.isdigit() or int(count) > len(records):
        return None
    return int(count) if digest(records[: int(count)]) == synced else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, int | float) else None


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    """One metrics.jsonl record's numbers under Tune's result keys (a list `val_iou` becomes
    `val_iou_0`, `val_iou_1`, ...); `global_epoch` is the step, not a value."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "global_epoch":
            continue
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            number = _number(item)
            if number is not None:
                out[key if i is None else f"{key}_{i}"] = number
    return out


def final_scalars(final: dict[str, Any]) -> dict[str, float]:
    """final.json's numbers: `dense_test_miou`, `pruned_test_iou_<class>`, `inference_gmacs`,
    and the top-level ones prefixed `final_` (`final_achieved_sparsity`), apart from the
    per-epoch metrics of the same name."""
    names = [column_name(n) for n in final.get("class_names") or []]
    out: dict[str, float] = {}
    for block in ("dense", "pruned", "inference"):
        for key, value in (final.get(block) or {}).items():
            if isinstance(value, list):
                for i, item in enumerate(value):
                    label = names[i] if i < len(names) else str(i)
                    if _number(item) is not None:
                        out[f"{block}_{key}_{label}"] = _number(item)
            elif _number(value) is not None:
                out[f"{block}_{key}"] = _number(value)
    for key, value in final.items():
        if _number(value) is not None:
            out[f"final_{key}"] = _number(value)
    return out


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: {"optim": {"max_lr": 0.1}} -> {"optim.max_lr": 0.1}."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        out.update(
            flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}")
        )
    return out


def param_text(value: Any) -> str:
    """A param value as MLflow stores it: strings as they are, anything else as JSON."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:6000]  # MLflow's limit


def trial_params(trial: TrialFolder) -> dict[str, str]:
    """The trial's identity and its resolved config, flattened (`optim.max_lr`)."""
    params = {**flatten(trial.config), **trial.identity}
    return {key: param_text(value) for key, value in params.items()}


def trial_tags(trial: TrialFolder) -> dict[str, str | None]:
    """Tags to set (None: tags to remove)."""
    last = trial.records[-1] if trial.records else {}
    return {
        TRIAL_TAG: trial.name,
        "status": trial.status,
        "stage": last.get("stage"),
        "node": trial.env.get("node_ip") or trial.env.get("hostname"),
        "code_version": trial.env.get("code_version"),
        "error": trial.error[:5000] if trial.status == "errored" and trial.error else None,
    }


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


@contextmanager
def _warn_on_failure(what: str) -> Iterator[None]:
    """Tracking never stops a sweep: a failure is a warning (`corroprune track` catches up)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - any tracking failure, reported and survived
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        _warn(f"{what}: {type(err).__name__}: {first} (corroprune track RUN_DIR re-syncs)")


# ---- MLflow ---------------------------------------------------------------------------------


def _mlflow() -> Any:
    """MLflow's client module, or the UserError that says how to install it."""
    try:
        import mlflow.entities as entities
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UserError(MLFLOW_MISSING) from None
    return MlflowClient, entities


def check_mlflow_uri(uri: str) -> str:
    """The tracking URI, a SQLite path made absolute (Ray may move the driver's working folder);
    a UserError naming the value for a missing extra, an unsupported scheme, or a SQLite file
    that cannot be written."""
    _mlflow()
    scheme = uri.split(":", 1)[0].partition("+")[0].lower()
    if scheme not in DATABASE_SCHEMES + SERVER_SCHEMES:
        raise UserError(
            f"--mlflow {uri}: unsupported tracking URI; use sqlite:///path/mlflow.db (offline), "
            f"a database ({', '.join(DATABASE_SCHEMES[1:])}) or an MLflow server (http(s)://...)"
        )
    if scheme != "sqlite":
        return uri
    path_text = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
    if not path_text or path_text.startswith(":memory:"):
        raise UserError(f"--mlflow {uri}: give a database file, e.g. sqlite:///runs/mlflow.db")
    path = Path(path_text.partition("?")[0]).resolve()
    problem = _unwritable(path)
    if problem:
        raise UserError(f"--mlflow {uri}: cannot write {path} ({problem})")
    return f"sqlite:///{path}"


def _unwritable(path: Path) -> str | None:
    """Why SQLite could not write `path` (its folder is made if missing), or None."""
    if path.exists():
        if not path.is_file():
            return "not a file"
        if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
            return "no write permission"
        return None
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    return None if os.access(folder, os.W_OK) else f"no write permission in {folder}"


class MlflowRun:
    """One RUN_DIR's parent run in MLflow and its nested runs, one per trial folder."""

    def __init__(self, run_dir: Path, uri: str) -> None:
        client_class, self.entities = _mlflow()
        self.run_dir = Path(run_dir).resolve()
        self.uri = check_mlflow_uri(uri)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client = client_class(tracking_uri=self.uri)
            self.experiment_id = self._experiment()
            self.parent = self._parent()
        except Exception as err:  # noqa: BLE001 - unreachable server, bad database, ...
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"--mlflow {uri}: {type(err).__name__}: {first}") from None

    def _experiment(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        artifacts = None  # a server stores artefacts where it is configured to
        if self.uri.startswith("sqlite:///"):  # beside the database, not in the working folder
            artifacts = (Path(self.uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=artifacts)

    def _search(self, filter_string: str) -> list[Any]:
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string, order_by=["start_time ASC"], page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _parent(self) -> Any:
        """The parent run tagged with this RUN_DIR (made on first use), params and tags set."""
        found = self._search(f"tags.`{RUN_TAG}` = {_literal(str(self.run_dir))}")
        run = found[0] if found else None
        if run is None:
            tags = {RUN_TAG: str(self.run_dir)}
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=self.run_dir.name)
        sweep = _load(self.run_dir / "sweep.yaml", yaml.safe_load) or {}
        params = {k: param_text(v) for k, v in flatten(sweep).items() if k != "code_version"}
        tags = {"code_version": sweep.get("code_version"), "preset": sweep.get("preset")}
        self._update(run, params, tags)
        return self.client.get_run(run.info.run_id)

    def nested_runs(self) -> dict[str, Any]:
        """Trial name -> its nested run (the oldest, should there be more)."""
        runs = self._search(f"tags.`{PARENT_TAG}` = '{self.parent.info.run_id}'")
        out: dict[str, Any] = {}
        for run in runs:
            out.setdefault(run.data.tags.get(TRIAL_TAG), run)
        return out

    def _nested_run(self, name: str) -> Any | None:
        found = self._search(
            f"tags.`{PARENT_TAG}` = '{self.parent.info.run_id}' and tags.`{TRIAL_TAG}` = '{name}'"
        )
        return found[0] if found else None

    def _update(self, run: Any, params: dict[str, str], tags: dict[str, str | None]) -> None:
        """Params MLflow lacks, tags that differ. MLflow never changes a param: one logged with
        another value (a resumed sweep's new resources) is kept as a tag of the same name."""
        have, tagged = run.data.params, run.data.tags
        new = [self.entities.Param(k, v) for k, v in params.items() if k not in have]
        changed = {k: v for k, v in params.items() if k in have and have[k] != v}
        tags = {**tags, **changed}
        set_tags = [
            self.entities.RunTag(k, str(v))
            for k, v in tags.items()
            if v is not None and tagged.get(k) != str(v)
        ]
        run_id = run.info.run_id
        for i in range(0, max(len(new), len(set_tags)), MAX_PARAMS):
            self.client.log_batch(
                run_id, params=new[i : i + MAX_PARAMS], tags=set_tags[i : i + MAX_PARAMS]
            )
        for key in [k for k, v in tags.items() if v is None and k in tagged]:
            self.client.delete_tag(run_id, key)

    def sync_trial(self, trial_dir: Path, run: Any | None = None) -> str:
        """Bring the trial's nested run up to date with its folder; returns its run id.
        `run`: the nested run when the caller has searched for it already."""
        trial = read_trial(Path(trial_dir))
        run = run or self._nested_run(trial.name)
        start = resume_at(trial.records, run.data.tags.get(SYNCED_TAG)) if run else 0
        if run is not None and start is None:  # re-run epochs: its history is written again
            self.client.delete_run(run.info.run_id)
            run, start = None, 0
        if run is None:
            tags = {PARENT_TAG: self.parent.info.run_id, TRIAL_TAG: trial.name}
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=trial.name)
        run_id = run.info.run_id
        self._update(run, trial_params(trial), trial_tags(trial))
        self._log_records(run_id, trial.records, start)
        if trial.final is not None and FINAL_TAG not in run.data.tags:
            step = int(trial.records[-1]["global_epoch"]) if trial.records else 0
            metrics = self._metrics(final_scalars(trial.final), step)
            self.client.log_batch(
                run_id, metrics=metrics, tags=[self.entities.RunTag(FINAL_TAG, "1")]
            )
        status = RUN_STATUS[trial.status]
        if run.info.status != status:
            if status == "RUNNING":
                self.client.update_run(run_id, status=status)
            else:
                self.client.set_terminated(run_id, status=status)
        return run_id

    def _metrics(self, values: dict[str, float], step: int) -> list[Any]:
        now = int(time.time() * 1000)
        return [self.entities.Metric(k, v, now, step) for k, v in values.items()]

    def _log_records(self, run_id: str, records: list[dict[str, Any]], start: int) -> None:
        """Records from `start` on, each batch with the SYNCED_TAG of what it completes (one
        call: a crash between batches leaves the tag true)."""
        batch: list[Any] = []
        for end in range(start + 1, len(records) + 1):
            record = records[end - 1]
            batch += self._metrics(epoch_scalars(record), int(record["global_epoch"]))
            if len(batch) >= BATCH_METRICS or end == len(records):
                tag = self.entities.RunTag(SYNCED_TAG, digest(records[:end]))
                self.client.log_batch(run_id, metrics=batch, tags=[tag])
                batch = []

    def sync_all(self) -> dict[str, str]:
        """Every trial folder; trial name -> its nested run id."""
        runs = self.nested_runs()
        return {
            path.name: self.sync_trial(path, runs.get(path.name))
            for path in trial_folders(self.run_dir)
        }

    def finish(self, ended: bool) -> None:
        """Attach the report's HTML pages; the parent FINISHED when the sweep `ended` or no
        trial is still running, RUNNING otherwise."""
        run_id = self.parent.info.run_id
        for page in sorted((self.run_dir / "report").glob("*.html")):
            self.client.log_artifact(run_id, str(page), artifact_path="report")
        running = any(read_trial(p).status == "running" for p in trial_folders(self.run_dir))
        if ended or not running:
            self.client.set_terminated(run_id, status="FINISHED")
        else:
            self.client.update_run(run_id, status="RUNNING")

    def start(self) -> None:
        """The parent RUNNING (a resumed sweep reopens a finished one)."""
        if self.parent.info.status != "RUNNING":
            self.client.update_run(self.parent.info.run_id, status="RUNNING")


def _literal(text: str) -> str:
    """A string literal for an MLflow search filter."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise UserError(f"MLflow cannot search for a path holding both kinds of quotes: {text}")


def log_run(run_dir: Path, uri: str) -> str:
    """Sync a whole RUN_DIR into MLflow at `uri` (a running or finished sweep, any number of
    times): its parent run, a nested run per trial folder, the report. Returns the parent's id."""
    mlflow_run = MlflowRun(run_dir, uri)
    mlflow_run.sync_all()
    mlflow_run.finish(ended=False)
    return mlflow_run.parent.info.run_id


# ---- TensorBoard ----------------------------------------------------------------------------


class TensorBoardFiles:
    """Event files under RUN_DIR/tensorboard/<trial name>/, one scalar per metrics.jsonl key at
    step `global_epoch`, so `tensorboard --logdir RUN_DIR/tensorboard` names every curve by its
    trial.

    A sync appends the records the files lack to the trial's open writer (a new event file per
    driver session, whose steps follow the earlier files'); when metrics.jsonl no longer starts
    with what the files hold, the trial's event files are deleted and written again. Writers
    stay open while a trial runs (an event file per epoch would be thousands of files).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.root = self.run_dir / TENSORBOARD
        self._writers: dict[str, Any] = {}

    def sync_trial(self, trial_dir: Path, keep_open: bool = False) -> int:
        """Write what the trial's event files lack; returns the records written."""
        records = read_jsonl(Path(trial_dir) / "metrics.jsonl")
        name = Path(trial_dir).name
        folder = self.root / name
        synced = _load(folder / TB_SYNCED, str.strip)
        start = resume_at(records, synced) if synced else None
        if start is None:  # new, or metrics.jsonl changed under it: (re)write it all
            self.close(name)
            for old in folder.glob("events.out.tfevents.*"):
                old.unlink()
            start = 0
        if start < len(records):
            writer = self._writers.get(name) or self._open(folder, records[start])
            for record in records[start:]:
                for key, value in epoch_scalars(record).items():
                    writer.add_scalar(key, value, int(record["global_epoch"]))
            writer.flush()
            self._writers[name] = writer
            write_text(folder / TB_SYNCED, digest(records) + "\n")
        if not keep_open:
            self.close(name)
        return len(records) - start

    @staticmethod
    def _open(folder: Path, first: dict[str, Any]) -> Any:
        from tensorboardX import SummaryWriter

        # Named by second and host: the first step tells apart two files of the same second.
        suffix = f".{int(first['global_epoch']):06d}"
        return SummaryWriter(logdir=str(folder), flush_secs=30, filename_suffix=suffix)

    def sync_all(self) -> int:
        return sum(self.sync_trial(path) for path in trial_folders(self.run_dir))

    def close(self, name: str | None = None) -> None:
        """Close one trial's writer, or every writer."""
        for key in [name] if name else list(self._writers):
            writer = self._writers.pop(key, None)
            if writer is not None:
                writer.close()


def write_tensorboard(run_dir: Path) -> Path:
    """Event files for every trial folder of a RUN_DIR (up to date ones untouched); their root."""
    files = TensorBoardFiles(run_dir)
    files.sync_all()
    return files.root


# ---- the sweep's driver ---------------------------------------------------------------------


class Tracker:
    """What the sweep's driver mirrors: TensorBoard files (unless turned off), an MLflow parent
    run (when a URI is given). Each trial is synced as it reports and when it ends; `finish`
    syncs every folder (trials finished by an earlier run of the sweep included)."""

    def __init__(self, run_dir: Path, mlflow: MlflowRun | None, tensorboard: bool) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.mlflow = mlflow
        self.tensorboard = TensorBoardFiles(self.run_dir) if tensorboard else None

    def reported(self, trial_dir: Path) -> None:
        self._sync(trial_dir, keep_open=True)

    def ended(self, trial_dir: Path) -> None:
        self._sync(trial_dir, keep_open=False)

    def _sync(self, trial_dir: Path, keep_open: bool) -> None:
        if self.tensorboard is not None:
            with _warn_on_failure(f"TensorBoard files of {trial_dir.name}"):
                self.tensorboard.sync_trial(trial_dir, keep_open=keep_open)
        if self.mlflow is not None:
            with _warn_on_failure(f"MLflow run of {trial_dir.name}"):
                self.mlflow.sync_trial(trial_dir)

    def finish(self) -> None:
        if self.tensorboard is not None:
            with _warn_on_failure("TensorBoard files"):
                self.tensorboard.close()
                self.tensorboard.sync_all()
            print(f"TensorBoard: tensorboard --logdir {self.tensorboard.root}", flush=True)
        if self.mlflow is not None:
            with _warn_on_failure("MLflow"):
                self.mlflow.sync_all()
                self.mlflow.finish(ended=True)
                print(
                    f"MLflow: run {self.mlflow.parent.info.run_id} '{self.run_dir.name}' in "
                    f"{self.mlflow.uri}",
                    flush=True,
                )

    def callbacks(self) -> list[Any]:
        """The Tune callback that feeds this tracker, or none when nothing is tracked."""
        if self.mlflow is None and self.tensorboard is None:
            return []
        return [tune_callback(self)]


def open_tracking(run_dir: Path, mlflow_uri: str | None, tensorboard: bool) -> Tracker:
    """The driver's tracker; the MLflow parent run found or made, and RUNNING."""
    mlflow = MlflowRun(run_dir, mlflow_uri) if mlflow_uri else None
    if mlflow is not None:
        mlflow.start()
    return Tracker(run_dir, mlflow, tensorboard)


def trial_dir_of(trial: Any) -> Path | None:
    """A Tune trial's folder: its config carries the sweep's trial spec (`out_dir`)."""
    out_dir = ((getattr(trial, "config", None) or {}).get("trial") or {}).get("out_dir")
    return Path(out_dir) if out_dir else None


def tune_callback(tracker: Tracker) -> Any:
    """A Tune callback calling `tracker` for each trial's reports and end (the one part of this
    module that imports Ray)."""
    from ray import tune

    class TrackTrials(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if (path := trial_dir_of(trial)) is not None:
                tracker.reported(path)

        def _ended(self, trial: Any) -> None:
            if (path := trial_dir_of(trial)) is not None:
                tracker.ended(path)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._ended(trial)

        def on_trial_recover(self, iteration, trials, trial, **info) -> None:
            self._ended(trial)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._ended(trial)

    return TrackTrials()
