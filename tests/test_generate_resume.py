"""Failures of ``maskray generate`` on real Ray (loopback, 2 CPUs), tiny model: a generator actor killed
mid-run; a driver killed mid-run then rerun; shard records deleted or corrupted between runs. All end with
every (prompt_id, sample_idx) exactly once, and a rerun generates only the samples that no good record or piece
holds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
from generate_helpers import check_exactly_once, config, shards

REPO = Path(__file__).resolve().parents[1]
def _generator_processes() -> list:
    import psutil

    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "MapBatches(Generator)" in " ".join(proc.info["cmdline"] or []) and \
                    me in [p.pid for p in proc.parents()]:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_killed_generator_actor_still_exactly_once(ray_local, tmp_path):
    from pipeline.generate import run_generate

    ids = shards(tmp_path / "prompts", count=2, per_shard=6, separator="-")
    cfg = config(str(tmp_path / "prompts"), str(tmp_path / "out"), steps=4, num_images=2)
    runs: list = []
    runner = threading.Thread(target=lambda: runs.append(run_generate(cfg, log=lambda _: None)))
    runner.start()
    parts = tmp_path / "out" / "_shards"
    killed_pid, written_at_kill = None, 0
    deadline = time.monotonic() + 120
    while runner.is_alive() and killed_pid is None and time.monotonic() < deadline:
        procs = _generator_processes()
        written = len(list(parts.glob("*.parquet"))) if parts.is_dir() else 0
        if procs and written:
            killed_pid, written_at_kill = procs[0].pid, written
            os.kill(killed_pid, signal.SIGKILL)  # the actor dies mid-run; Ray restarts it and retries its task
        time.sleep(0.05)
    runner.join(timeout=180)
    assert killed_pid is not None and written_at_kill < 12, "the generator was not killed mid-run"
    (result,) = runs
    assert result.rows == 24 and result.errors == 0 and result.shards_done == result.shards
    check_exactly_once(pq.read_table(tmp_path / "out" / "metrics.parquet"), ids, 2)
    assert [p.pid for p in _generator_processes()] != [killed_pid]


def test_driver_crash_then_rerun_then_lost_and_corrupt_records(ray_local, tmp_path):
    from pipeline.generate import run_generate

    ids = shards(tmp_path / "prompts", count=3, per_shard=6, separator="-")
    out, records = tmp_path / "out", tmp_path / "out" / "_shards"
    command = [sys.executable, "-m", "jobs.cli", "generate", "--prompts", str(tmp_path / "prompts"), "--out",
               str(out), "--batch-size", "2", "--steps", "4", "--width", "32", "--height", "32", "--shard-size", "2"]
    driver = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 150
    try:
        while driver.poll() is None and time.monotonic() < deadline and len(list(records.glob("*.parquet"))) < 2:
            time.sleep(0.05)
    finally:
        _kill_tree(driver)  # the driver and the Ray it started die at once
    before = {p.name: p.read_bytes() for p in records.glob("*.parquet")}
    done = [(k, i) for blob in before.values() for k, i in zip(*_keys(blob))]
    assert 2 <= len(before) < 9 and len(done) == 2 * len(before), "the driver was not killed mid-run"
    # rows the crash left in pieces of shards without a record: the rerun keeps them (pipeline.partial)
    pieces = [p for p in (out / "_pieces").glob("*/*.parquet") if f"{p.parent.name}.parquet" not in before]
    in_pieces = {(k, i) for p in pieces for k, i in zip(*_keys(p.read_bytes()))}

    cfg = config(str(tmp_path / "prompts"), str(out), steps=4)  # no --shard-size: the run keeps its own
    summary = run_generate(cfg, log=lambda _: None)
    assert (summary.rows, summary.shards, summary.generated) == (18, 9, 18 - len(done) - len(in_pieces))
    check_exactly_once(pq.read_table(out / "metrics.parquet"), ids, 1)
    after = {p.name: p.read_bytes() for p in records.glob("*.parquet")}
    assert all(after[name] == blob for name, blob in before.items())  # written shards were not redone
    redone = [(k, i) for name, blob in after.items() if name not in before for k, i in zip(*_keys(blob))]
    assert not set(redone) & set(done) and len(redone) == 18 - len(done)
    assert not (out / "_pieces").exists()

    lost, corrupt, *kept = sorted(after)
    (records / lost).unlink()
    (records / corrupt).write_bytes(b"PAR1 truncated")
    lines: list[str] = []
    summary = run_generate(cfg, log=lines.append)
    assert (summary.rows, summary.generated) == (18, 4)  # the two shards of 2 samples, nothing else
    assert any(corrupt in line and "unreadable" in line for line in lines)
    assert all((records / name).read_bytes() == after[name] for name in kept)
    assert _keys((records / lost).read_bytes()) == _keys(after[lost])
    check_exactly_once(pq.read_table(out / "metrics.parquet"), ids, 1)


def _kill_tree(driver: subprocess.Popen) -> None:
    """SIGKILL a driver with every process below it, and wait until all are gone. Its process group is not
    enough: Ray's raylet puts worker processes in groups of their own, so a worker could otherwise finish a
    write after the kill and a shard record would appear after the test has listed them."""
    import psutil

    try:
        tree = [psutil.Process(driver.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    os.killpg(driver.pid, signal.SIGKILL)
    for proc in tree:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    driver.wait()
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"processes outlived SIGKILL: {alive}"


def _keys(blob: bytes) -> tuple[list, list]:
    import io

    table = pq.read_table(io.BytesIO(blob), columns=["prompt_id", "sample_idx"])
    return table["prompt_id"].to_pylist(), table["sample_idx"].to_pylist()
