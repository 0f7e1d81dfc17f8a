"""Test-wide environment: offline hub, Ray on loopback, a fresh model cache per session."""

import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("MASKRAY_CACHE", tempfile.mkdtemp(prefix="maskray-test-cache-"))

import pytest  # noqa: E402
from loopback import free_port

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``tests/fixtures/``: reference vectors and data the tests compare against (see its README)."""
    return FIXTURES


@pytest.fixture(scope="module")
def tiny_meissonic():
    """The random-weight tiny Meissonic pipeline on CPU, loaded once per module."""
    import mgt

    return mgt.load_pipeline("tiny-meissonic", device="cpu")


@pytest.fixture(scope="module")
def tiny_amused():
    """The random-weight tiny aMUSEd pipeline on CPU, loaded once per module."""
    import mgt

    return mgt.load_pipeline("tiny-amused", device="cpu")


@pytest.fixture(scope="module")
def tiny_maskgit():
    """The random-weight tiny MaskGIT pipeline (16x16 tokens, ImageNet classes) on CPU, loaded once per module."""
    import mgt

    return mgt.load_pipeline("tiny-maskgit", device="cpu")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module of tiny tensors: it avoids OpenMP barrier stalls when the 2 cores are
    shared (10x faster here)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray (2 CPUs, loopback, no dashboard) for one test module; Ray Data progress bars off."""
    import ray

    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def s3():
    """A moto S3 server on loopback for one test, starting with no buckets; yields its fsspec storage options.

    moto keeps its buckets per process and s3fs reuses one filesystem (with its cached listings) per argument
    set, so both are reset here: a test never sees another test's buckets or talks to a stopped server."""
    import requests
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    requests.post(f"{endpoint}/moto-api/reset", timeout=30).raise_for_status()
    s3fs.S3FileSystem.clear_instance_cache()
    yield {"key": "AKIAMASKRAYTESTKEY", "secret": "maskray-secret-value-42", "client_kwargs": {"endpoint_url": endpoint}}
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The :func:`s3` server, also named by the AWS_* variables, for code that opens ``s3://`` without options."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["client_kwargs"]["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3
