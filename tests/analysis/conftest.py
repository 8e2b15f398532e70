"""Fake run directories for the analysis tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.analysis.fake_run import write_fake_run


@pytest.fixture(scope="session")
def fake_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A partial two-dataset run (one errored, one running, one not started); do not modify it."""
    return write_fake_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture()
def own_run_dir(tmp_path: Path) -> Path:
    """A fresh copy of the fake run that a test may change."""
    return write_fake_run(tmp_path / "run")
