"""``ray_session``: Ray starts only when the job connects, locally without a dashboard, and stops after; once
connected, stderr leaves out Ray's harmless actor-restart error line (``jobs.stderr_filter``)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import ray

from jobs.ray_session import ray_session
from jobs.stderr_filter import RAY_RESTART_WARNING, StderrFilter

REPO = Path(__file__).resolve().parents[1]


def test_local_ray_starts_on_connect_without_dashboard_and_stops(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with ray_session() as connect:
        assert not ray.is_initialized()  # a bad input fails before Ray starts
        connect()
        assert ray.is_initialized()
        assert not ray._private.worker.global_worker.node.address_info.get("webui_url")
    assert not ray.is_initialized()


# In a fresh process: Ray logs the line once per process, so an earlier test in this one may have used it up.
RAY_DATA_POOL = """
import os, sys
from pathlib import Path
from jobs.ray_session import ray_session

class Echo:  # the smallest Ray Data actor UDF, one tiny constructor argument
    def __init__(self, tag):
        self.tag = tag

    def __call__(self, batch):
        return batch

with ray_session() as connect:
    connect()
    import ray
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = ray.data.range(2).map_batches(Echo, fn_constructor_kwargs={"tag": 1}, num_cpus=0.5,
                                         compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    sys.stdout.buffer.write(next(logs.glob(f"python-core-driver-*_{os.getpid()}.log")).read_bytes())
"""


def test_ray_data_pool_warning_goes_to_the_driver_log_not_to_stderr(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = subprocess.run([sys.executable, "-c", RAY_DATA_POOL], cwd=REPO, capture_output=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    driver_log = result.stdout
    # Ray Data's pool actor logged it whatever the UDF's arguments; the job's stderr left it out
    assert RAY_RESTART_WARNING in driver_log and b"MapWorker(MapBatches(Echo))" in driver_log
    assert RAY_RESTART_WARNING not in result.stderr


def test_nothing_to_stop_when_never_connected():
    with ray_session():
        pass
    assert not ray.is_initialized()


def test_stderr_filter_drops_only_the_marked_lines_and_passes_partial_lines_on(capfd):
    quiet = StderrFilter(b"MARK").start()
    os.write(2, b"kept 1\n[E 1 1] core_worker.cc: a MARKed line, in one write as Ray writes it\nprogress 50%\r")
    time.sleep(0.5)
    assert capfd.readouterr().err == "kept 1\nprogress 50%\r"  # a partial line is passed on after the quiet time
    os.write(2, b"kept 2\nlast, unterminated")
    quiet.stop()
    assert capfd.readouterr().err == "kept 2\nlast, unterminated"
