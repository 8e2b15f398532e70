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


# The tests that start Ray. Under `make test` (two pytest-xdist workers) they run on one worker,
# one after another: the simulated-cluster tests stop every Ray on the machine.
RAY_TEST_FILES = (
    "tests/sweep/test_sweep.py",
    "tests/sweep/test_hpo.py",
    "tests/sweep/test_cluster_sim.py",
)


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Whole test files go to one worker each (their module fixtures are built once), and the
    Ray test files all to the same one. (xdist's own `loadgroup` does not group with pytest 9.2.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "ray" if path in RAY_TEST_FILES else path

    config.option.loadscopereorder = False  # keep the collection order: the Ray queue first
    return FileScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The Ray tests first: they are the longest queue, so its worker starts on it at once."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.nodeid.split("::", 1)[0] not in RAY_TEST_FILES)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under xdist, a worker that starts on other tests lowers its own priority (once, for good):
    the Ray queue is the longest, and much of it waits on Ray's own processes, so the other worker
    fills those gaps instead of taking the CPU from the queue that decides when the run ends."""
    global _niced
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and not _niced and item.nodeid.split("::", 1)[0] not in RAY_TEST_FILES:
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
