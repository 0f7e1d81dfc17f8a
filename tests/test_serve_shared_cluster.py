"""``maskray serve`` on a cluster that already runs Serve with another application (a ``ray start --head``).

The cluster's proxy listens on 0.0.0.0 for an unrelated app at ``/other``, as an earlier user left it. Then
``maskray serve --host 127.0.0.1`` without a key must not deploy onto that proxy (it would answer on every
interface, unauthenticated), and SIGTERM to a ``maskray serve`` running there must remove maskray's application
only. Every Ray process of the cluster is found by its temp dir and stopped after the module.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from test_autoscale import free_port, stop_session

from jobs.serve_cmd import check_running_proxy, proxy_url

REPO = Path(__file__).resolve().parents[1]
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
TINY = ["--model", "tiny-meissonic", "--device", "cpu", "--num-cpus", "0.5"]


@pytest.fixture(scope="module")
def shared_cluster():
    """A Ray head on 127.0.0.1 whose Serve proxy listens on 0.0.0.0:PORT with an app ``other`` at ``/other``."""
    temp = Path(tempfile.mkdtemp(prefix="mrsh-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    gcs, http = free_port(), free_port()
    env = {**os.environ, **ENV}
    log = temp / "head.log"
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", "2",
         "--include-dashboard", "false", "--ray-client-server-port", str(free_port()), "--temp-dir", str(temp),
         "--disable-usage-stats"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in ENV.items():
            patch.setenv(name, value)
        try:
            deadline = time.time() + 120
            while "Ray runtime started" not in log.read_text():
                if time.time() > deadline or head.poll() is not None:
                    pytest.fail("the Ray head did not come up on 127.0.0.1 within 120 s:\n" + log.read_text()[-3000:])
                time.sleep(0.5)
            import ray
            from ray import serve

            @serve.deployment(ray_actor_options={"num_cpus": 0.1})
            def other(_request) -> str:
                return "other app"

            ray.init(address=f"127.0.0.1:{gcs}", log_to_driver=False)
            serve.start(http_options={"host": "0.0.0.0", "port": http})
            serve.run(other.bind(), name="other", route_prefix="/other")
            assert requests.get(f"http://127.0.0.1:{http}/other", timeout=10).text == "other app"
            yield {"address": f"127.0.0.1:{gcs}", "port": http, "env": {**env, "HF_HUB_OFFLINE": "1"}}
        finally:
            import ray

            ray.shutdown()
            left = stop_session(head, str(temp))
    assert not left, f"processes of the shared cluster survived: {sorted(left)} (logs in {temp})"
    shutil.rmtree(temp, ignore_errors=True)


def _serve(cluster: dict, log: Path, *flags: str, api_key: str | None = None) -> subprocess.Popen:
    """``maskray serve`` with ``flags`` on the cluster, its output written to ``log``."""
    env = {key: value for key, value in cluster["env"].items() if key != "MASKRAY_API_KEY"}
    if api_key is not None:
        env["MASKRAY_API_KEY"] = api_key
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--address", cluster["address"], *TINY, *flags],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _status(url: str, headers: dict[str, str] | None = None) -> int | None:
    """The HTTP status of GET ``url``, None while nothing answers (the proxy drops connections as routes change)."""
    try:
        return requests.get(url, headers=headers, timeout=10).status_code
    except requests.RequestException:
        return None


def _refusal(server: subprocess.Popen, log: Path, port: int, timeout_s: float = 120) -> str:
    """The output of a ``maskray serve`` expected to refuse; fails as soon as it serves on ``port`` instead."""
    deadline = time.time() + timeout_s
    while server.poll() is None:
        served = _status(f"http://127.0.0.1:{port}/v1/models")
        if served == 200 or time.time() > deadline:
            server.kill()
            server.wait()
            pytest.fail(f"maskray serve was not refused (GET /v1/models: {served}):\n{log.read_text()[-3000:]}")
        time.sleep(1)
    assert server.returncode == 2, log.read_text()[-3000:]
    return log.read_text()


def test_a_loopback_request_is_refused_onto_a_proxy_on_every_interface(shared_cluster, tmp_path):
    port, log = shared_cluster["port"], tmp_path / "serve.log"
    output = _refusal(_serve(shared_cluster, log, "--host", "127.0.0.1", "--port", str(port)), log, port)
    (line,) = [line for line in output.splitlines() if line.startswith("maskray serve: error")]
    assert f"http://0.0.0.0:{port}" in line and "--use-running-proxy" in line, line
    # deploying onto it anyway needs a key, since 0.0.0.0 is not loopback
    server = _serve(shared_cluster, log, "--host", "127.0.0.1", "--port", str(port), "--use-running-proxy")
    output = _refusal(server, log, port)
    assert "without an API key" in output and "0.0.0.0" in output, output[-3000:]


def test_sigterm_removes_only_maskrays_application(shared_cluster, tmp_path):
    from ray import serve

    port, log = shared_cluster["port"], tmp_path / "serve.log"
    server = _serve(shared_cluster, log, "--host", "0.0.0.0", "--port", str(port), "--app-name", "maskray-shared",
                    api_key="shared-key")
    try:
        deadline = time.time() + 240
        while "/v1/images/generations (docs" not in log.read_text():  # printed once serve.run has returned
            assert server.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert f"at http://0.0.0.0:{port}/v1/images/generations" in log.read_text()
        assert _status(f"http://127.0.0.1:{port}/v1/models", {"Authorization": "Bearer shared-key"}) == 200
        assert _status(f"http://127.0.0.1:{port}/v1/models") == 401  # the driver's key reached the replicas
        assert set(serve.status().applications) == {"other", "maskray-shared"}
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert set(serve.status().applications) == {"other"}
    assert requests.get(f"http://127.0.0.1:{port}/other", timeout=10).text == "other app"


def test_the_running_proxy_rules_without_ray():
    live = {"host": "0.0.0.0", "port": 8000, "root_path": "", "ssl_certfile": None}
    assert proxy_url(live) == "http://0.0.0.0:8000"
    assert proxy_url({**live, "root_path": "/api", "ssl_certfile": "c.pem"}) == "https://0.0.0.0:8000/api"
    assert check_running_proxy("0.0.0.0", 8000, live, use_running_proxy=False) == "0.0.0.0"
    with pytest.raises(ValueError, match="listens on http://0.0.0.0:8000, not 127.0.0.1:8000"):
        check_running_proxy("127.0.0.1", 8000, live, use_running_proxy=False)
    with pytest.raises(ValueError, match="not 0.0.0.0:9000"):
        check_running_proxy("0.0.0.0", 9000, live, use_running_proxy=False)
    assert check_running_proxy("127.0.0.1", 9000, live, use_running_proxy=True) == "0.0.0.0"
    with pytest.raises(ValueError, match="runs no HTTP proxy"):
        check_running_proxy("127.0.0.1", 8000, {**live, "host": None}, use_running_proxy=True)
