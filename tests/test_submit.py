"""``maskray submit`` runs a tiny generate job end to end on a real Ray head started on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from loopback import free_port

from jobs.cli import main
from jobs.submit_cmd import check_out_path, job_env, upload_size

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def ray_head():
    """A Ray head (with dashboard and Jobs API) in its own temp dir; killed with all its processes after."""
    temp = Path(tempfile.mkdtemp(prefix="mrhead-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    dashboard = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port",
         str(free_port()), "--num-cpus", "2", "--include-dashboard", "true", "--temp-dir", str(temp),
         "--disable-usage-stats"],
        env=env, stdout=open(temp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # it answers (401 while token auth is on): it is up
            break
        except OSError:
            if time.time() > deadline or head.poll() is not None:
                head.kill()
                pytest.fail("the Ray head did not come up on 127.0.0.1 within 120 s:\n"
                            + (temp / "head.log").read_text()[-3000:])
            time.sleep(1)
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", str(temp)], check=False)  # raylet/GCS children outside the group
    shutil.rmtree(temp, ignore_errors=True)


def test_relative_out_is_refused():
    with pytest.raises(ValueError, match="relative"):
        check_out_path(["--prompts", "p.parquet", "--out", "out"])
    assert check_out_path(["--out=s3://b/run"]) == "s3://b/run"


def test_repository_upload_is_small():
    assert upload_size(ROOT) < 100 * 2**20


def test_unreachable_cluster_is_one_clear_error(capsys, tmp_path):
    code = main(["submit", "--address", f"http://127.0.0.1:{free_port()}", "generate", "--out", str(tmp_path)])
    assert code == 2
    assert "cannot reach the Ray cluster" in capsys.readouterr().err


def test_submit_generate_end_to_end(ray_head, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # 2.60 heads require the local token by default
    result = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "submit", "--address", ray_head, "--submission-id", "maskray-test-1",
         "generate", "--prompts", "examples/prompts.parquet", "--out", str(out), "--steps", "2", "--width", "32",
         "--height", "32", "--batch-size", "4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "submitted maskray-test-1" in result.stdout and "SUCCEEDED" in result.stdout
    assert "maskray generate:" in result.stdout  # the job's own log lines were streamed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["errors"] == 0
    assert len(list((out / "images").iterdir())) == manifest["counts"]["rows"] > 0


def test_credentials_reach_the_job_only_through_forward_env(ray_head):
    secrets = {"AWS_ACCESS_KEY_ID": "aws-id-0x41", "AWS_SECRET_ACCESS_KEY": "aws-secret-0x5f3",
               "HF_TOKEN": "hf-secret-0x77"}
    env = {**os.environ, "RAY_AUTH_MODE": "token", **secrets}

    def submit(job_id: str, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "jobs.cli", "submit", "--address", ray_head, "--submission-id",
                               job_id, "--no-wait", *flags, "generate", "--help"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    def job_list() -> str:  # what anyone who reaches the dashboard sees
        listed = subprocess.run(["ray", "job", "list", "--address", ray_head], env=env, capture_output=True,
                                text=True, timeout=120)
        assert listed.returncode == 0, listed.stderr[-2000:]
        return listed.stdout

    default = submit("maskray-test-env-1")
    assert default.returncode == 0, default.stderr[-2000:]
    listed = job_list()
    assert "maskray-test-env-1" in listed and not any(value in listed for value in secrets.values())
    opted_in = submit("maskray-test-env-2", "--forward-env", "HF_TOKEN")
    assert opted_in.returncode == 0, opted_in.stderr[-2000:]
    assert "HF_TOKEN" in opted_in.stderr and "hf-secret-0x77" not in opted_in.stdout + opted_in.stderr  # the warning
    listed = job_list()
    assert "hf-secret-0x77" in listed and "aws-secret-0x5f3" not in listed


def test_forward_env_names_must_be_set_here():
    with pytest.raises(ValueError, match="--forward-env HF_TOKEN"):
        job_env({}, [], ["HF_TOKEN"])
    assert job_env({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "t"}, ["A=b"], []) == {"HF_HUB_OFFLINE": "1", "A": "b"}
