"""One local Ray for the whole test session (starting Ray costs seconds), started again after a
test that ran its own cluster (the simulated-cluster tests stop every Ray on the machine)."""

import pytest


@pytest.fixture
def local_ray(_ray_session):
    ray = _ray_session
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def _ray_session():
    ray = pytest.importorskip("ray")
    yield ray
    ray.shutdown()
