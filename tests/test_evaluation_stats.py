"""Win rate, bootstrap intervals and the sign test on synthetic paired scores with known answers."""

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from jobs.evaluation.report import markdown, summarize, write_report
from jobs.evaluation.stats import bootstrap_ci, compare, sign_test


def test_counts_and_win_rate():
    baseline = np.zeros(100)
    candidate = np.array([1.0] * 70 + [0.0] * 10 + [-1.0] * 20)
    result = compare(candidate, baseline)
    assert (result.wins, result.ties, result.losses, result.n) == (70, 10, 20, 100)
    assert result.win_rate == pytest.approx(0.70)
    assert result.win_rate_excluding_ties == pytest.approx(70 / 90)
    assert result.mean_difference == pytest.approx(0.5)
    assert result.win_rate_ci.low < 0.70 < result.win_rate_ci.high
    # the binomial standard error is 0.0458: a 95% interval is about +-0.09 wide
    assert 0.55 < result.win_rate_ci.low < 0.65 and 0.75 < result.win_rate_ci.high < 0.85


def test_sign_test_matches_the_exact_binomial_tail():
    # two-sided: 2 * P(X >= 70) for X ~ Bin(90, 1/2)
    tail = sum(math.comb(90, k) for k in range(70, 91)) / 2**90
    assert sign_test(70, 20) == pytest.approx(2 * tail, rel=1e-9)
    assert sign_test(5, 5) == pytest.approx(1.0)
    assert sign_test(0, 0) == 1.0


def test_identical_samplers_tie_everywhere():
    scores = np.random.default_rng(0).normal(size=50)
    result = compare(scores, scores.copy())
    assert (result.wins, result.ties, result.losses) == (0, 50, 0)
    assert result.sign_test_p == 1.0 and result.mean_difference == 0.0


def test_bootstrap_interval_of_a_known_mean():
    values = np.random.default_rng(1).normal(loc=3.0, scale=1.0, size=400)
    ci = bootstrap_ci(values, seed=0)
    assert ci.low < values.mean() < ci.high
    assert ci.high - ci.low == pytest.approx(2 * 1.96 / 20, rel=0.25)  # 2 * 1.96 * sigma / sqrt(n)


def test_mismatched_pairs_are_refused():
    with pytest.raises(ValueError, match="one length"):
        compare(np.zeros(3), np.zeros(4))


def _scores():
    rows = []
    for i in range(40):
        base = float(i % 7)
        for sampler, delta in (("vanilla", 0.0), ("noise", 1.0 if i % 4 else -1.0)):
            rows.append({"sampler": sampler, "prompt_id": f"p{i}", "sample_idx": 0, "prompt": f"prompt {i}",
                         "category": "a" if i < 20 else "b", "score": base + delta, "nfe": 8,
                         "gen_seconds": 0.5, "image_uri": f"mem://{sampler}/{i}.png", "error": None})
    return pd.DataFrame(rows)


def test_summary_and_report_files(tmp_path):
    scores = _scores()
    summary = summarize(scores, "vanilla", ["noise"])
    overall = summary["comparisons"]["noise"]["overall"]
    assert (overall["wins"], overall["losses"]) == (30, 10)
    assert set(summary["comparisons"]["noise"]["by_category"]) == {"a", "b"}
    assert summary["samplers"]["noise"]["images_per_second"] == pytest.approx(2.0)
    assert "| `noise` | 40 | 30 / 0 / 10 | 75.0%" in markdown(summary)

    def read_bytes(uri):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (int(uri.split("/")[-1][:-4]) * 5, 0, 0)).save(buffer, "PNG")
        return buffer.getvalue()

    write_report(scores, "vanilla", ["noise"], tmp_path, read_bytes)
    assert json.loads((tmp_path / "report.json").read_text())["baseline"] == "vanilla"
    for name in ("win_rates.png", "scores.png", "grid.png"):
        assert Image.open(tmp_path / name).size[0] > 0
    assert (tmp_path / "report.md").read_text().startswith("# Sampler evaluation")


def test_report_names_a_spec_candidate_by_its_spec():
    """A spec with overrides runs under a folder-safe name; the report shows what the user wrote."""
    from jobs.evaluation.run import sampler_name

    spec = "vanilla:token_temperature=0.25"
    name = sampler_name(spec)
    assert name != spec
    scores = _scores().replace({"sampler": {"noise": name}})
    summary = summarize(scores, "vanilla", [name], specs={name: spec, "vanilla": "vanilla"})
    assert summary["specs"] == {"vanilla": "vanilla", name: spec}
    text = markdown(summary)
    assert f"| `{spec}` | 40 | 30 / 0 / 10 |" in text and f"## `{spec}` by category" in text
    assert name not in text
