"""``RowStage``: the base of the Ray Data stages, which checks their input columns and isolates failing rows.

As Ray Data LLM's processor stages do (``ray/llm/_internal/batch/stages/base.py``: required input keys
checked on entry, row errors kept as data), a stage declares ``REQUIRED_COLUMNS`` and a ``process(batch)``;
``__call__`` checks the columns once for every stage, and :meth:`RowStage.run_isolated` gives every stage
the same rule for errors: a batch that fails is retried row by row, so one bad row costs only itself, and
``fail_fast`` re-raises the first error instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class RowStage:
    """A batch UDF over column batches (``dict[str, np.ndarray]``) with declared input columns.

    Subclasses set ``REQUIRED_COLUMNS`` (column -> description, shown when a column is missing) and
    ``fail_fast``, and implement :meth:`process`.
    """

    REQUIRED_COLUMNS: dict[str, str] = {}
    fail_fast: bool = False

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name in self.REQUIRED_COLUMNS if name not in batch]
        if missing:
            needs = "; ".join(f"{name}: {self.REQUIRED_COLUMNS[name]}" for name in missing)
            raise KeyError(f"{type(self).__name__} needs columns {missing} ({needs}); got {sorted(batch)}")
        return self.process(batch)

    def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The stage's work on a batch whose required columns are present."""
        raise NotImplementedError

    def run_isolated(self, rows: list[int], run: Callable[[list[int]], None],
                     describe: Callable[[BaseException, int], str]) -> dict[int, str]:
        """``run(rows)`` in one call; if it raises, ``run([row])`` for each row alone.

        Running a row alone gives the result it gets in the batch (every sample owns its generator and the
        scorers score each pair independently), so the retry changes nothing but who fails.

        Args:
            rows: indices into the batch.
            run: does the work for some rows and stores their results.
            describe: the error text of a row that failed alone (``"Type: message ..."``).

        Returns:
            ``{row: describe(error, row)}`` for the rows that failed alone; empty when the batch succeeded.

        Raises:
            Exception: the batch's error, when ``fail_fast``.
        """
        try:
            run(rows)
            return {}
        except Exception:  # noqa: BLE001 - isolate the failing rows; batch-mates do not depend on each other
            if self.fail_fast:
                raise
        errors = {}
        for row in rows:
            try:
                run([row])
            except Exception as error:  # noqa: BLE001 - a bad row is data, not a dead job
                errors[row] = describe(error, row)
        return errors
