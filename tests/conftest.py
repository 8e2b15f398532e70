"""Shared test set-up: offline, deterministic, CPU threads pinned, tiny configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Idle OpenMP threads sleep instead of spinning: with two test workers (and Ray's trial
# processes) on two cores, spinning threads only take time from the ones with work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Ten real NEA frames (unlabelled) beside the checkout; never copied into the repository.
NEA_SAMPLE = Path(
    os.environ.get(
        "CORROPRUNE_NEA_SAMPLE",
        Path(__file__).resolve().parents[2] / "shared" / "data" / "nea-sample",
    )
)


# One torch thread per test worker under pytest-xdist (`make test` runs two), two otherwise. Set
# here, at import, so that module- and session-scoped fixtures run with it too.
TEST_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
torch.set_num_threads(TEST_THREADS)


# The tests that start Ray, in two queues that `make test` (two pytest-xdist workers) runs side by
# side, each on one worker: the local-Ray sweep and search tests, and the simulated clusters (each
# with its own Ray temp folder and address, stopping only its own processes).
RAY_QUEUES = {
    "tests/sweep/test_sweep.py": "ray-local",
    "tests/sweep/test_hpo.py": "ray-local",
    "tests/sweep/test_cluster_sim.py": "ray-cluster",
    "tests/sweep/test_budget.py": "ray-cluster",
}


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Whole test files go to one worker each (their module fixtures are built once), and each
    Ray queue to one worker. (xdist's own `loadgroup` does not group with pytest 9.2.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = _file(nodeid)
            return RAY_QUEUES.get(path, path)

    config.option.loadscopereorder = False  # keep the collection order: the Ray queues first
    return FileScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The Ray queues first: they are the longest, so each worker starts on one at once."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: _file(item.nodeid) not in RAY_QUEUES)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under xdist, a worker lowers its own priority (once, for good) when it moves on to the other
    tests: a Ray queue still running on the other worker decides when the run ends, and much of it
    waits on Ray's own processes, so these tests fill those gaps instead of taking its CPU."""
    global _niced
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and not _niced and _file(item.nodeid) not in RAY_QUEUES:
        os.nice(10)
        _niced = True


_niced = False


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Synthetic sets are generated into a per-session cache, never the user's home."""
    os.environ["CORROPRUNE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def tiny_config(**sections: dict) -> dict:
    """A raw trial config small enough for CPU tests (seconds per stage)."""
    base = {
        "seed": 0,
        "data": {
            "dataset": "synthetic",
            "crop_size": 64,
            "synthetic": {"train": 10, "test": 4, "size": 64, "classes": 4, "seed": 1},
        },
        "model": {"arch": "fpn", "encoder": "tu-test_resnet", "encoder_weights": None},
        "optim": {"batch_size": 4, "half_cycle_iters": 4},
        "stages": {"train_epochs": 2, "prune_epochs": 2, "finetune_epochs": 1},
        "pruning": {"steps": 2, "mp_warmup_epochs": 0, "mp_cooldown_epochs": 1},
        "runtime": {"device": "cpu", "progress": False},
    }
    from trainables.config import merge

    return merge(base, sections)
