"""Test-wide environment: offline hub, Ray on loopback, a fresh model cache per session."""

import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("MASKRAY_CACHE", tempfile.mkdtemp(prefix="maskray-test-cache-"))

import pytest  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``tests/fixtures/``: reference vectors and data the tests compare against (see its README)."""
    return FIXTURES


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray (2 CPUs, loopback, no dashboard) for one test module; Ray Data progress bars off."""
    import ray

    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
