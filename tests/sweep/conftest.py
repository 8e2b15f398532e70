"""One local Ray for the whole test session (starting Ray costs seconds), started again after a
test that ran a cluster of its own in this process (the simulated-cluster tests)."""

import pytest


@pytest.fixture
def local_ray(_ray_session):
    ray = _ray_session
    if not ray.is_initialized():
        # "local": a Ray of its own even while another test worker's simulated cluster (or a
        # `ray start` left running) would be found by address auto-detection.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def _ray_session():
    ray = pytest.importorskip("ray")
    yield ray
    ray.shutdown()
