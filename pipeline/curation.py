"""Curation: which candidates of a sample a run keeps (``--best-of N --keep K``, ``--min-score S``).

Every sample slot (``prompt_id``, ``sample_idx``) is generated ``N`` times (candidates 0..N-1, seeds from
``pipeline.prompts.candidate_seed``) and every candidate is scored. The ``K`` best scored candidates of a slot are
kept, ties going to the lower candidate index; with ``--min-score`` a kept candidate scoring below ``S`` is
dropped (``kept = false``). Failed or unscored candidates are never kept.

Selection happens when the sink assembles a shard (``pipeline.sinks.datasink``), not in a Ray Data stage: a
shard is cut at prompt rows, so all candidates of a slot are in one shard, and assembly is the one place that
sees a whole shard whatever blocks Ray Data made (a scorer batch may split a slot's candidates). The choice
depends only on the candidates' scores, so a resumed shard picks what a run in one go would have picked.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class Curation:
    """The run's selection settings (``JobOptions.best_of``, ``keep``, ``min_score``, ``keep_all_images``)."""

    best_of: int = 1
    keep: int = 1
    min_score: float | None = None
    keep_all_images: bool = False

    @property
    def active(self) -> bool:
        """Candidates are selected: images wait for assembly, and only kept ones are written (unless asked)."""
        return self.best_of > 1 or self.min_score is not None

    def kept(self, columns: dict[str, list]) -> list[bool]:
        """Per row of a whole shard (columns ``prompt_id``, ``sample_idx``, ``candidate``, ``score``, ``error``),
        whether the run keeps it."""
        ids, samples = columns["prompt_id"], columns["sample_idx"]
        candidates = [c or 0 for c in columns.get("candidate") or [0] * len(ids)]
        scores, errors = columns["score"], columns["error"]
        good = [not e and s is not None and s == s for s, e in zip(scores, errors)]
        if not self.active:
            return [not e for e in errors]
        slots: dict[tuple[str, int], list[int]] = {}
        for row, key in enumerate(zip(ids, samples)):
            if good[row]:
                slots.setdefault(key, []).append(row)
        kept = [False] * len(ids)
        for rows in slots.values():
            for row in sorted(rows, key=lambda r: (-scores[r], candidates[r]))[:self.keep]:
                kept[row] = self.min_score is None or scores[row] >= self.min_score
        return kept


def slot_outcomes(record: pa.Table) -> dict[str, int]:
    """Of a completion record's slots: how many have a kept candidate, and why the others have none.

    Returns ``{"kept": n, "below_min_score": n, "no_good_candidate": n}`` (slots whose candidates all failed, or
    none was scored), counted per (prompt_id, sample_idx).
    """
    if record.num_rows == 0:
        return {"kept": 0, "below_min_score": 0, "no_good_candidate": 0}
    good = pc.and_(pc.is_null(record["error"]), pc.is_valid(record["score"]))
    table = pa.table({"prompt_id": record["prompt_id"], "sample_idx": record["sample_idx"],
                      "kept": pc.fill_null(record["kept"], False), "good": good})
    slots = table.group_by(["prompt_id", "sample_idx"]).aggregate([("kept", "any"), ("good", "any")])
    kept = pc.sum(slots["kept_any"]).as_py() or 0
    scored = pc.sum(slots["good_any"]).as_py() or 0
    dropped_scored = pc.sum(pc.and_(slots["good_any"], pc.invert(slots["kept_any"]))).as_py() or 0
    return {"kept": kept, "below_min_score": dropped_scored, "no_good_candidate": slots.num_rows - scored}
