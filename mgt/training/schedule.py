"""The learning-rate schedule the shapes trainers share: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int, floor: float):
    """``LambdaLR`` with factor ``min(1, (s+1)/warmup) * (floor + (1-floor) * (1 + cos(pi s/steps)) / 2)``."""
    def factor(step: int) -> float:
        decay = 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
        return min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * decay)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
