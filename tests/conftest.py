"""Shared test set-up: offline, deterministic, CPU threads pinned, tiny configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

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


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)


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
