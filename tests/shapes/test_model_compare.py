"""tests/benchmarks/shapes_model_compare.py pairs two models' images by (caption, seed) and calls a figure ahead,
behind or level from the interval of the paired difference."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "benchmarks" / "shapes_model_compare.py"
SINGLE, COUNT = "a red circle", "two blue squares"


def write_measurement(path: Path, single_scores: list[float], single_reads: list[str], count_scores: list[float]):
    """A shapes_model.py output with one row holding these per-image records (seed = position)."""
    samples = [{"caption": SINGLE, "seed": i, "kind": "single", "score": s, "read_shape": r}
               for i, (s, r) in enumerate(zip(single_scores, single_reads, strict=True))]
    samples += [{"caption": COUNT, "seed": i, "kind": "count", "score": s, "read_shape": None}
                for i, s in enumerate(count_scores)]
    path.write_text(json.dumps({"rows": [{"per_sample": samples}]}))


def run(tmp_path, *files):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, files), "--out", str(tmp_path / "out.json")],
                          capture_output=True, text=True, cwd=ROOT)


def test_a_consistent_gain_is_ahead_and_a_noisy_one_is_level(tmp_path):
    n = 40
    write_measurement(tmp_path / "cand.json", [0.9] * n, ["circle"] * n, [0.0, 1.0] * (n // 2))
    write_measurement(tmp_path / "base.json", [0.5] * n, ["circle"] * (n // 2) + ["square"] * (n // 2),
                      [1.0, 0.0] * (n // 2))

    result = run(tmp_path, tmp_path / "cand.json", tmp_path / "base.json")

    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "out.json").read_text())["figures"]
    assert figures["single"]["verdict"] == "ahead" and figures["single"]["mean_difference"] == pytest.approx(0.4)
    assert figures["single shape accuracy"]["mean_candidate"] == 1.0
    assert figures["single shape accuracy"]["mean_baseline"] == 0.5
    assert figures["single shape accuracy"]["verdict"] == "ahead"
    # the count images win and lose in turn: same mean, an interval across zero
    assert figures["count"]["verdict"] == "level" and figures["count"]["wins"] == figures["count"]["losses"] == n // 2
    assert set(figures) == {"mean score", "score > 0.5", "count", "single", "single shape accuracy"}
    assert figures["score > 0.5"]["verdict"] == "ahead"
    assert "| single | 40 | 0.900 | 0.500 | +0.400" in result.stdout


def test_measurements_of_different_seeds_are_refused_by_name(tmp_path):
    write_measurement(tmp_path / "cand.json", [0.9, 0.9], ["circle", "circle"], [])
    write_measurement(tmp_path / "base.json", [0.5], ["circle"], [])

    result = run(tmp_path, tmp_path / "cand.json", tmp_path / "base.json")

    assert result.returncode != 0
    assert "different (caption, seed) pairs" in result.stderr and "--seeds-per-caption" in result.stderr


def test_a_measurement_without_per_image_records_says_to_measure_again(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"rows": [{"mean_score": 0.3}]}))
    write_measurement(tmp_path / "base.json", [0.5], ["circle"], [])

    result = run(tmp_path, tmp_path / "old.json", tmp_path / "base.json")

    assert result.returncode != 0 and "measure the model again" in result.stderr


def test_a_second_measurement_set_is_pooled_with_the_first_even_where_captions_recur(tmp_path):
    write_measurement(tmp_path / "cand.json", [0.9] * 4, ["circle"] * 4, [])
    write_measurement(tmp_path / "base.json", [0.5] * 4, ["circle"] * 4, [])
    write_measurement(tmp_path / "cand2.json", [0.7] * 6, ["circle"] * 6, [])  # same caption and seeds 0-3 again
    write_measurement(tmp_path / "base2.json", [0.5] * 6, ["circle"] * 6, [])

    result = run(tmp_path, tmp_path / "cand.json", tmp_path / "base.json",
                 "--and", tmp_path / "cand2.json", tmp_path / "base2.json")

    assert result.returncode == 0, result.stderr
    single = json.loads((tmp_path / "out.json").read_text())["figures"]["single"]
    assert single["n"] == 10 and single["mean_difference"] == pytest.approx((4 * 0.4 + 6 * 0.2) / 10)


def test_differences_below_the_tables_resolution_are_level_ties(tmp_path):
    write_measurement(tmp_path / "cand.json", [2e-8] * 20, ["none"] * 20, [])  # what a triple caption scores
    write_measurement(tmp_path / "base.json", [1e-8] * 20, ["none"] * 20, [])

    assert run(tmp_path, tmp_path / "cand.json", tmp_path / "base.json").returncode == 0

    single = json.loads((tmp_path / "out.json").read_text())["figures"]["single"]
    assert single["verdict"] == "level" and single["wins"] == 0 and single["ties"] == 20
