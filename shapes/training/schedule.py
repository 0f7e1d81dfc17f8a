"""What the shapes trainers share: the learning-rate schedule (linear warm-up, then cosine decay to a floor)
and one optimizer step."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int, floor: float):
    """``LambdaLR`` with factor ``min(1, (s+1)/warmup) * (floor + (1-floor) * (1 + cos(pi s/steps)) / 2)``."""
    def factor(step: int) -> float:
        decay = 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
        return min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * decay)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler,
                   loss: torch.Tensor, clip: list[torch.nn.Parameter] | None = None) -> float:
    """Backward, gradient-norm clipping to 1 of ``clip`` if given, one optimizer and one schedule step;
    returns the loss value (for progress bars)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    optimizer.step()
    schedule.step()
    return loss.item()
