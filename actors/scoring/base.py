"""What every image scorer is and the helpers they share: the ``Scorer`` contract, device and dtype
defaults, and input checks with batching.

A scorer maps (image, prompt) pairs to one float each, higher meaning a better match. The scorers
(``actors.scoring.hps``, ``actors.scoring.clip_score``, and those plugins register) import this module;
it imports none of them, and loads neither torch nor PIL until a helper runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

if TYPE_CHECKING:
    import torch
    from PIL import Image


class Scorer(Protocol):
    """What every scorer offers: one float per (image, prompt) pair, in input order."""

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]: ...


_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else is checked by torch."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from error


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` -> fp16 on CUDA (the scorers are inference only) and fp32 elsewhere."""
    import torch

    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    return getattr(torch, _DTYPES[dtype])


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
