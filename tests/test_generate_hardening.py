"""Issue 23 through the real ``maskray`` CLI (a local Ray per run, tiny model, 2 steps): failed samples exit 3
and are retried on rerun, refusals before Ray exit 2, a crash is recorded as a failed attempt, credentials never
reach the manifest, the metrics, the output or ``--print-config``, and a live lock on ``--out`` refuses a second
run (on the S3 protocol, a moto server on loopback). Then, without Ray: the redaction rules, and two runs racing
for one local ``--out`` (exactly one holds it)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from generate_helpers import shards

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--batch-size", "2", "--steps", "2", "--width", "32", "--height", "32"]


def maskray(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_usage_errors_are_refused_before_ray(tmp_path):
    shards(tmp_path / "prompts", count=1, per_shard=2)
    out = tmp_path / "out"
    cases = [
        (["generate", "--prompts", str(tmp_path / "prompts"), "--out", str(out), "--steps", "4",
          "--sampler", "zsampling:zsampling.num_steps=50"], "zsampling.num_steps=50 is more than T-1=3"),
        (["generate", "--prompts", str(tmp_path / "prompts"), "--out", str(out), "--model", "tiny-meisonic"],
         "model 'tiny-meisonic' is not a local folder"),
        (["evaluate", "--prompts", str(tmp_path / "prompts"), "--out", str(out), "--scorer", "hps-v2", "--steps",
          "4", "--candidates", "noise,zsampling:zsampling.num_steps=9"], "zsampling.num_steps=9 is more than T-1=3"),
    ]
    for args, message in cases:
        started = time.monotonic()
        result = maskray(*args)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.stderr and time.monotonic() - started < 60
    assert not out.exists()  # nothing written, no Ray started


def test_failed_samples_exit_3_and_a_crash_is_recorded_as_a_failed_attempt(tmp_path):
    shards(tmp_path / "prompts", count=1, per_shard=2)
    out = tmp_path / "out"
    # 33 px is off the model's 16 px grid: every row fails in the generator (only the loaded model knows its grid)
    args = ["generate", "--prompts", str(tmp_path / "prompts"), "--out", str(out), "--batch-size", "2", "--steps",
            "2", "--width", "33", "--height", "32"]
    result = maskray(*args)
    assert result.returncode == 3, result.stderr
    assert f"2 of 2 samples failed; their errors are in {out}/metrics.parquet" in result.stderr
    metrics = pq.read_table(out / "metrics.parquet")
    assert metrics.num_rows == 2 and all("width 33 is not a multiple" in e for e in metrics["error"].to_pylist())
    assert manifest(out)["status"] == "incomplete" and manifest(out)["counts"]["errors"] == 2

    crashed = maskray(*args, "--fail-fast")  # the failed shard is retried, and now the first error stops the run
    assert crashed.returncode == 1 and "Traceback" in crashed.stderr
    record = manifest(out)
    assert record["status"] == "failed" and [a["status"] for a in record["attempts"]] == ["incomplete", "failed"]
    error = record["attempts"][-1]["error"]
    assert error["type"] and "width 33 is not a multiple" in error["message"] + error.get("detail", "")
    assert not (out / "_lock.json").exists()  # the crashed run released --out


def test_failed_samples_are_retried_on_rerun_unless_kept(tmp_path):
    shards(tmp_path / "prompts", count=1, per_shard=2)
    out = tmp_path / "out"
    args = ["generate", "--prompts", str(tmp_path / "prompts"), "--out", str(out), "--shard-size", "1", *SMALL]
    assert maskray(*args).returncode == 0
    records = sorted((out / "_shards").glob("*.parquet"))
    assert len(records) == 2
    # what a transient failure (CUDA OOM, a lost connection) leaves: a completion record with an error row
    table = pq.read_table(records[0])
    failed = table.set_column(table.schema.get_field_index("error"), "error",
                              pa.array(["OutOfMemoryError: CUDA out of memory"], pa.string()))
    pq.write_table(failed, records[0])
    kept_bytes, other_bytes = records[0].read_bytes(), records[1].read_bytes()

    kept = maskray(*args, "--keep-failed")
    assert kept.returncode == 3 and "1 of 2 samples failed" in kept.stderr
    assert records[0].read_bytes() == kept_bytes and manifest(out)["attempts"][-1]["generated"] == 0

    retried = maskray(*args)
    assert retried.returncode == 0, retried.stderr
    assert "holding 1 failed sample(s)" in retried.stdout
    assert pq.read_table(records[0])["error"].null_count == 1  # regenerated, now without error
    assert records[1].read_bytes() == other_bytes  # the good shard was not redone
    assert manifest(out)["status"] == "complete" and manifest(out)["attempts"][-1]["generated"] == 1
    assert pq.read_table(out / "metrics.parquet")["error"].null_count == 2


def test_s3_secrets_never_leave_and_a_live_lock_refuses_a_second_run(tmp_path, s3):
    import s3fs
    import yaml

    fs = s3fs.S3FileSystem(**s3)
    fs.mkdir("bucket")
    shards(tmp_path / "prompts", count=1, per_shard=2)
    fs.put(str(tmp_path / "prompts") + "/", "bucket/prompts/", recursive=True)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"prompts": "s3://bucket/prompts/", "out": "s3://bucket/run",
                                      "storage_options": s3}))
    secrets = (s3["key"], s3["secret"])

    printed = maskray("generate", "--config", str(config), "--print-config")
    assert printed.returncode == 0 and not any(s in printed.stdout for s in secrets)
    options = yaml.safe_load(printed.stdout)["storage_options"]
    assert options["key"] == options["secret"] == "***"
    assert options["client_kwargs"] == s3["client_kwargs"]  # the endpoint stays readable

    other = {"host": "other-host", "pid": 4242, "token": "x", "started_at": "2026-01-01T00:00:00+00:00"}
    fs.pipe("bucket/run/_lock.json", json.dumps({**other, "heartbeat": time.time()}).encode())
    refused = maskray("generate", "--config", str(config), *SMALL)
    assert refused.returncode == 2 and "is in use by pid 4242 on host other-host" in refused.stderr
    assert "--force" in refused.stderr and not fs.exists("bucket/run/manifest.json")

    fs.pipe("bucket/run/_lock.json", json.dumps({**other, "heartbeat": time.time() - 600}).encode())
    result = maskray("generate", "--config", str(config), *SMALL)
    assert result.returncode == 0, result.stderr
    assert "taking over the stale lock" in result.stdout and not fs.exists("bucket/run/_lock.json")
    fs.invalidate_cache()
    parts = fs.find("bucket/run/metrics.parquet")
    written = [fs.cat_file("bucket/run/manifest.json")] + [fs.cat_file(p) for p in parts]
    for text in [printed.stdout, result.stdout, result.stderr, *[b.decode("latin-1") for b in written]]:
        assert not any(s in text for s in secrets)
    record = json.loads(written[0])
    assert record["status"] == "complete" and record["config"]["job"]["storage_options"]["secret"] == "***"
    metrics = pq.read_table(io.BytesIO(written[1]))
    assert metrics.num_rows == 2 and pc.all(pc.is_null(metrics["error"])).as_py()

    resumed = maskray("generate", "--config", str(config), *SMALL)  # redaction keeps the config hash: resume
    assert resumed.returncode == 0 and json.loads(fs.cat_file("bucket/run/manifest.json"))["counts"]["generated"] == 0


def test_redaction_rules_and_scrubbed_error_text():
    from pipeline.redact import REDACTED, redact, redact_text, secret_values

    config = {"job": {"out": "s3://b/run", "storage_options": {
        "key": "AKIAEXAMPLE", "secret": "s3cr3t-value", "profile": "prod-admin", "anon": False,
        "client_kwargs": {"endpoint_url": "http://minio:9000", "region_name": "eu-west-1",
                          "aws_session_token": "session-token-1"}}},
        "model": {"hub_token": "hf_abcdef", "steps": 4}}
    hidden = redact(config)
    options = hidden["job"]["storage_options"]
    assert options["key"] == options["secret"] == options["profile"] == REDACTED and options["anon"] is False
    assert options["client_kwargs"] == {"endpoint_url": "http://minio:9000", "region_name": "eu-west-1",
                                        "aws_session_token": REDACTED}
    assert hidden["model"] == {"hub_token": REDACTED, "steps": 4} and hidden["job"]["out"] == "s3://b/run"
    text = redact_text("403 for AKIAEXAMPLE with s3cr3t-value (profile prod-admin)", secret_values(config))
    assert text == "403 for *** with *** (profile prod-admin)"  # hidden in the config, but not a secret to scrub


def test_two_runs_on_one_local_out_cannot_both_hold_the_lease(tmp_path):
    import threading

    from pipeline.lease import OutBusy, RunLease
    from pipeline.storage import Storage

    storage, outcomes = Storage(str(tmp_path / "out")), []

    def run() -> None:
        try:
            with RunLease(storage, log=lambda _: None):
                outcomes.append("held")
                time.sleep(1.5)
        except OutBusy as error:
            outcomes.append(str(error))

    threads = [threading.Thread(target=run) for _ in range(2)]  # both find no lease, then race to write it
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refused = [o for o in outcomes if o != "held"]
    assert len(outcomes) == 2 and len(refused) == 1 and "is in use by pid" in refused[0]
    assert not (tmp_path / "out" / "_lock.json").exists()
