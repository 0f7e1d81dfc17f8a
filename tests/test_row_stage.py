"""``RowStage``: required columns checked on entry, failing rows isolated as data unless ``fail_fast``."""

import numpy as np
import pytest

from actors.stage import RowStage


class Double(RowStage):
    """Doubles ``x``; a negative ``x`` fails, and so does every batch that holds one."""

    REQUIRED_COLUMNS = {"x": "a number (int64); negative ones fail"}

    def __init__(self, fail_fast: bool = False):
        self.fail_fast = fail_fast
        self.calls: list[list[int]] = []

    def process(self, batch):
        x = batch["x"]
        out = np.full(len(x), -1, dtype=np.int64)

        def run(rows):
            self.calls.append(list(rows))
            if any(x[i] < 0 for i in rows):
                raise ValueError(f"negative in rows {rows}")
            out[rows] = 2 * x[rows]

        errors = self.run_isolated(list(range(len(x))), run, lambda error, row: f"row {row}: {error}")
        return {"x": x, "y": out, "error": np.array([errors.get(i, "") for i in range(len(x))], dtype=object)}


def test_a_good_batch_runs_in_one_call():
    stage = Double()
    out = stage({"x": np.array([1, 2, 3])})
    assert out["y"].tolist() == [2, 4, 6] and stage.calls == [[0, 1, 2]] and not any(out["error"])


def test_a_bad_row_costs_only_itself():
    stage = Double()
    out = stage({"x": np.array([1, -2, 3])})
    assert out["y"].tolist() == [2, -1, 6]
    assert out["error"].tolist() == ["", "row 1: negative in rows [1]", ""]
    assert stage.calls == [[0, 1, 2], [0], [1], [2]]


def test_fail_fast_reraises_the_batch_error():
    with pytest.raises(ValueError, match=r"negative in rows \[0, 1\]"):
        Double(fail_fast=True)({"x": np.array([1, -2])})


def test_missing_columns_are_named_with_their_description():
    with pytest.raises(KeyError, match=r"Double needs columns \['x'\] \(x: a number \(int64\); negative ones "
                                       r"fail\); got \['z'\]"):
        Double()({"z": np.array([1])})
