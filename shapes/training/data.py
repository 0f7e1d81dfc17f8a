"""Scene batches as tensors: every training step draws fresh scenes, so the data never repeats."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from shapes import scenes


def scene_tensors(seeds: Sequence[int]) -> tuple[torch.Tensor, list[scenes.Scene]]:
    """``(B, 3, 64, 64)`` float32 images in [0, 1] (the range the pipeline's VQ decode clips to) and the scenes."""
    batch = [scenes.make_scene(int(s)) for s in seeds]
    return render_tensors(batch), batch


def render_tensors(batch: Sequence[scenes.Scene]) -> torch.Tensor:
    """``(B, 3, 64, 64)`` float32 images in [0, 1] of the given scenes (which may be edited copies)."""
    images = np.stack([np.asarray(scenes.render(s)) for s in batch])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)


def training_seeds(run_seed: int, step: int, batch_size: int, part: int = 0) -> list[int]:
    """The scene seeds of one training step, always below the held-out range.

    The same (run seed, part, step) always gives the same batch; each ``part`` (VQ, generator, detector)
    and each run seed reads its own stretch of 10 million scenes, so steps within it never repeat a scene.
    """
    start = ((run_seed * 8 + part) * 10_000_000 + step * batch_size) % (scenes.HELD_OUT_START - batch_size)
    return list(range(start, start + batch_size))
