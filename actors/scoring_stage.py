"""``ScoringStage``: a registered scorer (``actors.scoring.registry``) as a batch UDF over encoded-image rows.

Ray Data calls it with column batches from the ``Generator``: it decodes the image bytes, scores each
(image, prompt) pair with one ``scorer.score`` call and adds a ``score`` column. Rows that already carry an
``error`` (no image) pass through with ``score = NaN``; a row whose image cannot be scored gets the scorer's
error in ``error`` instead of killing the job, unless ``fail_fast``.
"""

from __future__ import annotations

import io

import numpy as np

from actors.scoring.registry import ScorerConfig, build_scorer_from_config
from actors.stage import RowStage


class ScoringStage(RowStage):
    """Holds one scorer per actor and scores encoded-image rows.

    Args:
        scorer: which scorer and how to load it (name, checkpoint, architecture, device, dtype, batch size).
        fail_fast: re-raise a scoring error instead of recording it in the row's ``error``.
    """

    REQUIRED_COLUMNS = {
        "image": "encoded image bytes (PNG/WebP/JPEG); b'' for a row that failed upstream",
        "prompt": "the prompt the image was generated from (str)",
        "error": "upstream error ('' when the row succeeded)",
    }

    def __init__(self, scorer: ScorerConfig | dict, *, fail_fast: bool = False):
        self.config = ScorerConfig.model_validate(scorer)
        self.fail_fast = fail_fast
        self.scorer = build_scorer_from_config(self.config)

    def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score every row that has an image.

        Args:
            batch: columns of B rows with at least ``image``, ``prompt`` and ``error``.

        Returns:
            The input columns plus ``score`` (B,) float64 (NaN where nothing was scored); ``error`` gains the
            scoring error of rows whose image could not be scored.
        """
        count = len(batch["image"])
        scores = np.full(count, np.nan, dtype=np.float64)
        errors = [str(e) for e in batch["error"]]
        todo = [i for i in range(count) if not errors[i] and len(batch["image"][i])]

        def score(rows: list[int]) -> None:
            scores[rows] = self._score(batch, rows)

        if todo:
            failed = self.run_isolated(todo, score, lambda error, _: f"scoring {type(error).__name__}: {error}")
            for index, message in failed.items():
                errors[index] = message
        out = dict(batch)
        out["score"] = scores
        out["error"] = np.array(errors, dtype=object)
        return out

    def _score(self, batch: dict[str, np.ndarray], rows: list[int]) -> list[float]:
        from PIL import Image

        images = [Image.open(io.BytesIO(bytes(batch["image"][i]))).convert("RGB") for i in rows]
        return self.scorer.score(images, [str(batch["prompt"][i]) for i in rows])
