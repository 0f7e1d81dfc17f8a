"""Paired statistics of a candidate sampler against the baseline, the way arXiv 2411.10781 reports them.

The paper's metric is the HPS v2 *winning rate*: the share of (prompt, seed) pairs where the candidate's
image scores higher than the baseline's image of the same prompt and seed. Ties are counted separately
(docs/samplers.md §9: how the paper counts them is not stated), and every estimate carries a bootstrap
95% interval over pairs; the sign test asks whether wins and losses could be a fair coin.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True)
class PairedComparison:
    """A candidate against the baseline over n paired scores."""

    n: int
    wins: int
    ties: int
    losses: int
    win_rate: float  # wins / n (ties count as not-won, as a strict "higher" comparison)
    win_rate_ci: Interval
    win_rate_excluding_ties: float  # wins / (wins + losses)
    mean_candidate: float
    mean_candidate_ci: Interval
    mean_baseline: float
    mean_baseline_ci: Interval
    mean_difference: float  # candidate - baseline
    mean_difference_ci: Interval
    sign_test_p: float  # two-sided exact binomial test of wins vs losses (ties dropped)

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_ci(values: np.ndarray, seed: int, resamples: int = 2000, level: float = 0.95) -> Interval:
    """Percentile bootstrap interval of the mean (a point interval when all values agree or n == 1)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2 or np.all(values == values[0]):
        mean = float(values.mean()) if values.size else float("nan")
        return Interval(mean, mean)
    result = stats.bootstrap((values,), np.mean, n_resamples=resamples, confidence_level=level,
                             method="percentile", rng=np.random.default_rng(seed))
    return Interval(float(result.confidence_interval.low), float(result.confidence_interval.high))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test; 1.0 when there is no decided pair."""
    if wins + losses == 0:
        return 1.0
    return float(stats.binomtest(wins, wins + losses, 0.5, alternative="two-sided").pvalue)


def compare(candidate: np.ndarray, baseline: np.ndarray, seed: int = 0, tie_tolerance: float = 0.0,
            resamples: int = 2000) -> PairedComparison:
    """Paired comparison of two score arrays aligned by (prompt, seed).

    Args:
        candidate: `(n,)` scores of the candidate sampler.
        baseline: `(n,)` scores of the baseline on the same prompts and seeds.
        tie_tolerance: differences with ``|d| <= tie_tolerance`` count as ties (0: exact equality).
    """
    candidate = np.asarray(candidate, dtype=np.float64)
    baseline = np.asarray(baseline, dtype=np.float64)
    if candidate.shape != baseline.shape or candidate.ndim != 1:
        raise ValueError(f"paired scores must be two 1-D arrays of one length, got {candidate.shape} and "
                         f"{baseline.shape}")
    if candidate.size == 0:
        raise ValueError("no paired scores to compare")
    difference = candidate - baseline
    won = difference > tie_tolerance
    lost = difference < -tie_tolerance
    wins, losses = int(won.sum()), int(lost.sum())
    ties = candidate.size - wins - losses
    return PairedComparison(
        n=int(candidate.size), wins=wins, ties=ties, losses=losses,
        win_rate=wins / candidate.size,
        win_rate_ci=bootstrap_ci(won.astype(np.float64), seed, resamples),
        win_rate_excluding_ties=wins / (wins + losses) if wins + losses else float("nan"),
        mean_candidate=float(candidate.mean()), mean_candidate_ci=bootstrap_ci(candidate, seed + 1, resamples),
        mean_baseline=float(baseline.mean()), mean_baseline_ci=bootstrap_ci(baseline, seed + 2, resamples),
        mean_difference=float(difference.mean()), mean_difference_ci=bootstrap_ci(difference, seed + 3, resamples),
        sign_test_p=sign_test(wins, losses),
    )
