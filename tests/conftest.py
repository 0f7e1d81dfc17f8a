"""Test-wide environment: offline hub, Ray on loopback, a fresh model cache per session."""

import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("MASKRAY_CACHE", tempfile.mkdtemp(prefix="maskray-test-cache-"))

import pytest  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"reference fixtures not found at {FIXTURES}: the repo must sit beside shared/")
    return FIXTURES
