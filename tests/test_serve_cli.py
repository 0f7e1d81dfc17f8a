"""``maskray serve`` as a user runs it: its API-key rules for exposed addresses, and a clean stop on SIGTERM.

The SIGTERM test runs the real command in a subprocess on 127.0.0.1 with its own Ray temp dir (``RAY_TMPDIR``),
so the Ray processes it starts are found by that dir in their environment, not by name.
"""

import logging
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
import yaml
from loopback import free_port

from jobs.cli import main
from jobs.cluster import ClusterSpec, render_rayservice
from jobs.serve.config import ServeConfig
from jobs.serve_cmd import check_auth

REPO = Path(__file__).resolve().parents[1]



def _processes_with_env(assignment: str) -> list[str]:
    """``pid command`` of every live process whose environment holds ``assignment`` (e.g. ``RAY_TMPDIR=/x``)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and assignment.encode() in (proc / "environ").read_bytes().split(b"\0"):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{proc.name} {command[:100]}")
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def test_exposed_host_without_key_is_refused_before_ray_starts(capsys, monkeypatch):
    monkeypatch.delenv("MASKRAY_API_KEY", raising=False)
    started = time.perf_counter()
    assert main(["serve", "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "without an API key" in err and "MASKRAY_API_KEY" in err and "--allow-unauthenticated" in err
    assert time.perf_counter() - started < 10  # refused up front: no Ray, no model


def test_auth_rules_of_serve_and_of_the_app(caplog):
    config = ServeConfig()
    assert check_auth(config, "0.0.0.0", {"MASKRAY_API_KEY": "k"}) is config
    assert check_auth(config, "127.0.0.1", {}).allow_unauthenticated  # loopback: only this machine reaches it
    assert check_auth(config, "::1", {}).allow_unauthenticated
    with pytest.raises(ValueError, match="--allow-unauthenticated"):
        check_auth(config, "my-host.example", {})
    allowed = ServeConfig(allow_unauthenticated=True)
    with caplog.at_level(logging.WARNING, logger="jobs.serve_cmd"):
        assert check_auth(allowed, "0.0.0.0", {}) is allowed
    assert "WITHOUT authentication" in caplog.text and "0.0.0.0" in caplog.text
    # the replicas' own rule (serve run / serve deploy / RayService, where the bind address is not known)
    with pytest.raises(ValueError, match="MASKRAY_API_KEY is unset or empty"):
        config.api_key({"MASKRAY_API_KEY": ""})
    assert config.api_key({"MASKRAY_API_KEY": "k"}) == "k" and allowed.api_key({}) is None


def test_rayservice_requires_the_api_key_from_the_secret():
    spec = ClusterSpec.model_validate(yaml.safe_load((REPO / "infra" / "cluster.yaml").read_text()))
    cluster = render_rayservice(spec, REPO)["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        key = next(item for item in container["env"] if item["name"] == "MASKRAY_API_KEY")
        assert key["valueFrom"]["secretKeyRef"] == {"name": spec.credentials_secret, "key": "MASKRAY_API_KEY"}
    with pytest.raises(ValueError, match="credentials_secret is unset"):
        render_rayservice(spec.model_copy(update={"credentials_secret": None}), REPO)


def test_sigterm_stops_serve_and_every_ray_process_it_started():
    ray_tmp = tempfile.mkdtemp(prefix="mrs-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("MASKRAY_API_KEY", None)
    log = Path(ray_tmp) / "serve.log"
    server = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the proxy has no route yet
                pass
            assert server.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 200  # loopback: no key
        assert _processes_with_env(f"RAY_TMPDIR={ray_tmp}")  # the check below can see Ray's processes
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=90) == 0
        assert "stopping" in log.read_text(), log.read_text()[-3000:]
        deadline = time.time() + 10
        while (left := _processes_with_env(f"RAY_TMPDIR={ray_tmp}")) and time.time() < deadline:
            time.sleep(0.5)
        assert not left, f"Ray processes left after SIGTERM: {left}"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for line in _processes_with_env(f"RAY_TMPDIR={ray_tmp}"):  # only the test's own session, if it failed
            os.kill(int(line.split()[0]), signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
