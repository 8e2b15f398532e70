"""The sweep the way a cluster runs it, on Ray's own simulators: an autoscaling cluster built from
cluster.yaml's node types (fake multi-node provider, logical GPUs), and a worker node removed
mid-trial (a spot preemption). Each test's Ray has its own port and session, and only its own
processes are stopped after it, so the other test worker's Ray runs beside it."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from sweep.grid import SweepConfig, expand
from sweep.tune import SweepRequest, run_stage, run_sweep
from tests.conftest import tiny_config
from trainables.checkpoint import read_jsonl
from trainables.provenance import code_version

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.cluster

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"
RAY = str(Path(sys.executable).with_name("ray"))
FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head node type
MAX_WORKERS = 2  # this machine's share of cluster.yaml's max_workers


def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command line) of every process on this machine, from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            found[int(stat.parent.name)] = (parent, (stat.parent / "cmdline").read_bytes())
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
    return found


def stop_ray_processes(*markers: bytes, timeout: float = 30) -> None:
    """Kill the processes whose command line holds one of `markers` (this test's Ray session
    folder, or an argument ending in its GCS port) and all their descendants (Ray's workers and
    agents rename themselves). Unlike `ray stop`, a Ray another test worker runs survives."""
    table = _processes()
    doomed = {
        pid
        for pid, (_, cmdline) in table.items()
        if pid != os.getpid() and any(m in cmdline for m in markers)
    }
    while True:  # close over descendants
        children = {pid for pid, (parent, _) in table.items() if parent in doomed} - doomed
        if not children:
            break
        doomed |= children
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in doomed) and time.monotonic() < deadline:
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Running, not a zombie (`ray start`'s processes belong to PID 1, which may not reap them)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def simulated_config(cluster_yaml: dict, gcs_address: str) -> dict:
    """cluster.yaml's node types (resources, min_workers) on the fake multi-node provider, whose
    nodes join the head at `gcs_address` (its own default: port 6379)."""
    types = cluster_yaml["available_node_types"]
    head = types[cluster_yaml["head_node_type"]]
    nodes = {FAKE_HEAD_TYPE: {"resources": head["resources"], "node_config": {}, "max_workers": 0}}
    for name, node in types.items():
        if name != cluster_yaml["head_node_type"]:
            nodes[name] = {
                "resources": node["resources"],
                "node_config": {},
                "min_workers": node.get("min_workers", 0),
                "max_workers": min(node.get("max_workers", MAX_WORKERS), MAX_WORKERS),
            }
    lists = ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands")
    commands = ("setup_commands", "head_setup_commands", "worker_setup_commands")
    starts = ("head_start_ray_commands", "worker_start_ray_commands")
    return {
        "cluster_name": "corroprune-sim",
        "max_workers": MAX_WORKERS,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "ray"},
        "available_node_types": nodes,
        "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts_sync_continuously": False,
        "file_mounts": {},
        **{key: [] for key in (*lists, *commands, *starts)},
    }


def _autoscaler_reporting(timeout: float = 60) -> None:
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    ray.init(address="auto", log_to_driver=False)
    deadline = time.monotonic() + timeout
    while not _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS):
        assert time.monotonic() < deadline, "the simulated autoscaler never reported"
        time.sleep(0.5)


@pytest.fixture
def autoscaling_cluster(tmp_path: Path):
    """A head advertising cluster.yaml's head resources (0 CPUs), GPU workers scaled from zero.
    On a port of its own, and only its own processes stopped after: another test worker's local
    Ray runs beside it undisturbed."""
    ray.shutdown()  # a local Ray an earlier test in this process started (`local_ray`)
    port = _free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    config = simulated_config(yaml.safe_load(CLUSTER.read_text()), address)
    path = tmp_path / "simulated-cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    head = config["available_node_types"][FAKE_HEAD_TYPE]["resources"]
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    # Every process of this cluster names its port or its session folder (known once connected).
    markers = [f":{port}\0".encode(), f"={port}\0".encode()]
    try:
        subprocess.run(
            [
                RAY,
                "start",
                "--head",
                f"--port={port}",
                f"--num-cpus={head.get('CPU', 0)}",
                f"--num-gpus={head.get('GPU', 0)}",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--autoscaling-config={path}",
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        _autoscaler_reporting()  # connects as `--address auto` does: the last `ray start`
        markers.append(ray._private.worker.global_worker.node.get_session_dir_path().encode())
        yield config
    finally:
        ray.shutdown()
        stop_ray_processes(*markers)


def _interval(trial: Path) -> tuple[float, float]:
    env = json.loads((trial / "env.json").read_text())
    start = datetime.fromisoformat(env["started_at"]).timestamp()
    return start, (trial / "final.json").stat().st_mtime


def test_sweep_scales_gpu_workers_from_zero(autoscaling_cluster: dict, tmp_path: Path) -> None:
    assert ray.cluster_resources().get("GPU", 0) == 0  # no GPU anywhere yet
    per_node = autoscaling_cluster["available_node_types"]["gpu_worker"]["resources"]
    sweep = SweepConfig.from_dict(
        {
            "datasets": ["synthetic"],
            "models": ["linknet"],
            "pruners": ["agp"],
            "sparsities": [0.2, 0.5],  # stage 2: two trials at once, one per GPU node
            # Half a node's CPUs: by CPUs alone two trials would share one node and its GPU.
            "cpus_per_trial": per_node["CPU"] / 2,
            "gpus_per_trial": 1,
        }
    )
    template = tiny_config(
        stages={"train_epochs": 1, "prune_epochs": 2, "finetune_epochs": 1},
        runtime={"threads": 1, "latency_repeats": 0},
    )
    status = run_sweep(SweepRequest("sim", sweep, template, tmp_path, {}, address="auto"))
    assert all(e is None for stage in ("dense", "pruned") for e in status[stage].values()), status
    trials = sorted((tmp_path / "trials").iterdir())
    assert len(trials) == 3
    envs = {t.name: json.loads((t / "env.json").read_text()) for t in trials}
    assert {e["trial_gpus"] for e in envs.values()} == {1.0}  # every trial got its GPU
    assert {e["code_version"] for e in envs.values()} == {code_version()}
    head = ray.get_runtime_context().get_node_id()
    nodes = {e["node_id"] for e in envs.values()}
    assert head not in nodes and 1 <= len(nodes) <= MAX_WORKERS  # workers, launched on demand
    # Only GPU workers were launched, within max_workers. (A finished trial's process takes the
    # next trial, so a node launched for the demand may end up idle: the autoscaler retires it.)
    launched = ray.cluster_resources().get("GPU", 0) / per_node["GPU"]
    assert len(nodes) <= launched <= MAX_WORKERS
    for a in trials:  # one GPU per node: trials on one node never overlap in time
        for b in trials:
            same = a < b and envs[a.name]["node_id"] == envs[b.name]["node_id"]
            if same:
                (a0, a1), (b0, b1) = _interval(a), _interval(b)
                assert a1 <= b0 or b1 <= a0, f"{a.name} and {b.name} shared one GPU"


@pytest.fixture
def two_gpu_nodes():
    """Ray's in-process cluster: a 0-CPU head and two one-GPU workers that a test can remove."""
    from ray.cluster_utils import Cluster

    # Fast health checks: a removed node is declared dead in about a second, not fifteen.
    health = {
        "health_check_initial_delay_ms": 0,
        "health_check_period_ms": 200,
        "health_check_failure_threshold": 3,
    }
    ray.shutdown()  # a local Ray an earlier test in this process started (`local_ray`)
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": health}
    )
    session = cluster.head_node.get_session_dir_path()
    try:
        workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
        stop_ray_processes(session.encode())  # what shutdown left


def test_preempted_node_trial_finishes_on_another_node(two_gpu_nodes, tmp_path: Path) -> None:
    cluster, workers = two_gpu_nodes
    sweep = SweepConfig.from_dict(
        {"datasets": ["synthetic"], "models": ["linknet"], "cpus_per_trial": 1, "max_failures": 2}
    )
    template = tiny_config(
        stages={"train_epochs": 8},
        runtime={"threads": 1, "latency_repeats": 0, "checkpoint_every_epochs": 1},
    )
    dense, _ = expand(sweep, template, tmp_path, {})
    trial = Path(dense[0].out_dir)
    seen: dict = {}

    def preempt() -> None:
        deadline = time.monotonic() + 120
        while len(read_jsonl(trial / "metrics.jsonl")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        seen["before"] = read_jsonl(trial / "metrics.jsonl")
        seen["node"] = json.loads((trial / "env.json").read_text())["node_id"]
        victim = next(w for w in workers if w.node_id == seen["node"])
        cluster.remove_node(victim, allow_graceful=False)

    watcher = threading.Thread(target=preempt)
    watcher.start()
    outcome = run_stage("preempt", [dense[0].as_param()], tmp_path, sweep, gpus=1)
    watcher.join()
    assert outcome == {dense[0].name: None}
    records = read_jsonl(trial / "metrics.jsonl")
    assert 2 <= len(seen["before"]) < 8, "the node must be removed mid-trial"
    assert [r["epoch"] for r in records] == list(range(1, 9))  # continued, nothing repeated
    # Epochs before the loss were not re-run (the last one seen may have been: its record is
    # written just before its checkpoint).
    assert records[: len(seen["before"]) - 1] == seen["before"][:-1]
    assert json.loads((trial / "env.json").read_text())["node_id"] != seen["node"]
