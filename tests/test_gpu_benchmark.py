"""The GPU throughput benchmark's smoke path runs on a CPU from a clean clone and writes every field."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_writes_every_setting(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(ROOT / "tests" / "benchmarks" / "gpu.py"), "--device", "cpu", "--smoke",
                    "--peak-tflops", "1", "--out", str(out)], check=True, cwd=tmp_path)
    result = json.loads(out.read_text())

    assert result["smoke"] and result["extrapolated"] and result["steps"] == 64 and result["timed_steps"] == 2
    assert result["compile_mode"] == "default" and result["peak_tflops_source"] == "--peak-tflops"
    variants = {"bf16", "bf16+compile", "tome0.25", "w8a8", "w4a8", "tome0.25+compile"}
    settings = result["settings"]
    assert {(r["variant"], r["batch"], r["micro_batch"]) for r in settings} == {
        (v, b, m) for v in variants for b in (1, 4, 8) for m in (1, None) if not (b == 1 and m is None)}
    for row in settings:
        assert row["seconds_per_image"] > 0, row
        assert row["seconds_per_image"] == pytest.approx(row["seconds_per_step"] * 64 / row["batch"])
        assert row["fraction_of_peak"] == pytest.approx(
            result["flops_per_image"] / row["seconds_per_image"] / 1e12)
        assert row["peak_memory_gib"] is None  # not measured on CPU
        assert (row["speedup_vs_eager"] > 0) if row["compiled"] else ("speedup_vs_eager" not in row)
    assert [(r["batch"], r["micro_batch"]) for r in result["vq_decode"]] == [(1, 1), (8, None)]
    assert all(r["seconds_per_image"] > 0 for r in result["vq_decode"])
    assert result["flops_per_image"] > 0 and result["parameters"] > 0
    cached = {r["sampler"]: r for r in result["cached_context"]}
    assert set(cached) == {"vanilla", "recap"} and cached["recap"]["steps"] == 3
    assert 0 < cached["recap"]["flops_ratio"] < 1 and cached["recap"]["seconds_per_image"] > 0
