"""What every image scorer is and the helpers they share: the ``Scorer`` contract, input checks and
``BatchedScorer``, which checks and batches for the scorers built on it (device and dtype resolution is
``mgt.hub.devices``).

A scorer maps (image, prompt) pairs to one float each, higher meaning a better match. The scorers
(``actors.scoring.hps``, ``actors.scoring.clip_score``, and those plugins register) import this module;
it imports none of them, and loads neither torch nor PIL until a helper runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from PIL import Image


class Scorer(Protocol):
    """What every scorer offers: one float per (image, prompt) pair, in input order."""

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]: ...


def check_pairs(images: Sequence[Any], prompts: Sequence[Any]) -> None:
    """Reject inputs that are not one PIL image per prompt string.

    Raises:
        ValueError: the two lists differ in length.
        TypeError: an element is not a ``PIL.Image.Image`` or not a ``str``.
    """
    from PIL import Image

    if len(images) != len(prompts):
        raise ValueError(f"score() needs one prompt per image; got {len(images)} images and {len(prompts)} prompts")
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{index}] is a {type(image).__name__}, expected a PIL.Image.Image")
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{index}] is a {type(prompt).__name__}, expected a str")


def chunks(count: int, batch_size: int | None) -> list[slice]:
    """Slices covering ``range(count)`` in pieces of ``batch_size`` (one piece when it is ``None``)."""
    step = batch_size or max(count, 1)
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


class BatchedScorer:
    """A scorer that checks its (image, prompt) pairs, then scores them ``batch_size`` at a time in input order.

    Subclasses call ``super().__init__(batch_size)`` and implement ``_score_batch``, one forward pass.

    Raises:
        ValueError: ``batch_size`` is neither ``None`` nor a positive integer.
    """

    def __init__(self, batch_size: int | None) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        self.batch_size = batch_size

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """The score of each ``images[i]`` against ``prompts[i]``, in input order.

        Raises:
            ValueError: ``len(images) != len(prompts)``.
            TypeError: An element is not a PIL image or not a string.
        """
        check_pairs(images, prompts)
        scores: list[float] = []
        for part in chunks(len(images), self.batch_size):
            scores.extend(self._score_batch(images[part], prompts[part]))
        return scores

    def _score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        raise NotImplementedError
