"""``RunResult``: what a finished ``maskray generate`` run left under ``--out``, the contract between the
dataflow and the commands built on it (``jobs/``), which read it by attribute, never by file name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The fields that ``manifest.json`` records as the run's ``counts`` (and in its attempt), in this order.
COUNTS = ("rows", "expected", "errors", "generated", "shards", "shards_done", "stale_records", "seconds",
          "images_per_second", "mean_score", "kept", "mean_kept_score", "dropped")


@dataclass(frozen=True)
class RunResult:
    """The counts of a run (``pipeline.manifest.finalize``), where its tables are, and how this attempt went.

    Attributes:
        rows: unique rows in the metrics table (one per sample and candidate), good and failed.
        expected: rows the run's shard plan holds (samples x ``--best-of``).
        errors: rows whose ``error`` is set (failed samples).
        generated: rows this attempt generated (0 when a rerun found everything done).
        shards: shards of the plan.
        shards_done: shards with a completion record.
        stale_records: records of shards not in this plan (another input or shard size), ignored.
        seconds: this attempt's generation time.
        images_per_second: ``generated / seconds`` (None when no time passed).
        mean_score: mean score of the scored rows (None without a scorer).
        metrics_uri: the metrics table, a Parquet dataset (``pipeline.manifest.read_metrics`` reads it).
        manifest_uri: the run's manifest (config, attempts, counts).
        kept: rows whose ``kept`` is true: the images that belong to the run's output.
        mean_kept_score: mean score of the kept rows (None without a scorer).
        dropped: when curating (``--best-of``, ``--min-score``), sample slots without a kept candidate, by reason:
            ``below_min_score`` (the best scored under ``--min-score``), ``no_good_candidate`` (every candidate
            failed or went unscored); empty otherwise.
        timings: seconds spent per phase of the run (``pipeline.generate.run_generate``).
        actors: per actor stage, the most actors alive at once, their nodes and start times.
    """

    rows: int
    expected: int
    errors: int
    generated: int
    shards: int
    shards_done: int
    stale_records: int
    seconds: float
    images_per_second: float | None
    mean_score: float | None
    metrics_uri: str
    manifest_uri: str
    kept: int = 0
    mean_kept_score: float | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    actors: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def missing(self) -> int:
        """Samples of the plan with no row at all (their shard has no record)."""
        return self.expected - self.rows

    @property
    def complete(self) -> bool:
        """Every sample of the plan is there, without error."""
        return not self.errors and not self.missing

    def counts(self) -> dict[str, Any]:
        """The counts ``manifest.json`` records (``COUNTS``), by name."""
        return {name: getattr(self, name) for name in COUNTS}
