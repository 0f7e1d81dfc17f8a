"""What every image scorer is and the helpers they share: the ``Scorer`` contract and input checks
with batching (device and dtype resolution is ``mgt.devices``).

A scorer maps (image, prompt) pairs to one float each, higher meaning a better match. The scorers
(``actors.scoring.hps``, ``actors.scoring.clip_score``, and those plugins register) import this module;
it imports none of them, and loads neither torch nor PIL until a helper runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def score_in_chunks(images: Sequence[Any], prompts: Sequence[Any], batch_size: int | None,
                    score_batch: Callable[[Sequence[Any], Sequence[Any]], list[float]]) -> list[float]:
    """Check the (image, prompt) pairs, then score them ``batch_size`` at a time, in input order."""
    check_pairs(images, prompts)
    scores: list[float] = []
    for part in chunks(len(images), batch_size):
        scores.extend(score_batch(images[part], prompts[part]))
    return scores
