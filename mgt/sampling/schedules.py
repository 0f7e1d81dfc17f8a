"""Mask and CFG-scale schedules (arXiv 2411.10781 §2-§3; MaskGIT's guidance ramp).

A mask schedule maps progress ``r = (i+1)/T`` (the share of steps done after step ``i``) to a mask ratio in
[0, 1] that falls from 1 towards 0. ``cosine`` and ``linear`` are computed exactly as diffusers'
``AmusedScheduler.step`` does (float32 torch arithmetic), so the per-step mask counts are bit-identical
to the reference sampler; the others are the families the paper's "new mask schedule" is drawn from.
The CFG-scale schedule gives the guidance of each step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

MaskSchedule = Callable[[torch.Tensor], torch.Tensor]


def cosine(ratio: torch.Tensor) -> torch.Tensor:
    return torch.cos(ratio * math.pi / 2)


def linear(ratio: torch.Tensor) -> torch.Tensor:
    return 1 - ratio


def arccos(ratio: torch.Tensor) -> torch.Tensor:
    return torch.arccos(ratio.clamp(0, 1)) / (math.pi / 2)


def power(p: float) -> MaskSchedule:
    """``1 - r**p``: p < 1 reveals many tokens early, p > 1 few."""

    def schedule(ratio: torch.Tensor) -> torch.Tensor:
        return 1 - ratio**p

    return schedule


def maskgit_counts(num_steps: int, num_tokens: int) -> list[int]:
    """Tokens MaskGIT v1.0 reveals at each step (``arccos_maskgit``): ``round(v_i / sum(v) * N)`` of
    ``v = arccos(linspace(1, 0, T)) / (pi/2)``, zeros raised to 1, the remainder added to the last step, in the
    reference's float32 arithmetic (valeoai/Maskgit-pytorch v1.0, ``Trainer/vit.py``, ``adap_sche``)."""
    share = torch.arccos(torch.linspace(1, 0, num_steps)) / (math.pi * 0.5)
    counts = ((share / share.sum()) * num_tokens).round()
    counts[counts == 0] = 1
    counts[-1] += num_tokens - counts.sum()
    return counts.int().tolist()


def get_schedule(name: str, power_exponent: float = 2.0) -> MaskSchedule:
    """The schedule called ``name`` (``cosine``, ``linear``, ``arccos``, ``arccos_maskgit`` or ``power``); the
    ratio of ``arccos_maskgit`` is arccos's (its per-step counts are :func:`maskgit_counts`)."""
    schedules: dict[str, MaskSchedule] = {"cosine": cosine, "linear": linear, "arccos": arccos,
                                          "arccos_maskgit": arccos}
    if name == "power":
        return power(power_exponent)
    if name not in schedules:
        raise ValueError(f"unknown mask schedule {name!r}; choose one of {sorted([*schedules, 'power'])}")
    return schedules[name]


def mask_ratio(schedule: MaskSchedule, step_index: int, num_steps: int) -> torch.Tensor:
    """Mask ratio after step ``step_index`` of ``num_steps``, as a float32 scalar tensor."""
    ratio = torch.tensor(step_index + 1) / num_steps  # float32, as in AmusedScheduler.step
    return schedule(ratio)


def num_to_mask(schedule: MaskSchedule, step_index: int, num_steps: int, seq_len: int, num_masked: int) -> int:
    """How many tokens stay masked after step ``step_index`` (``m_i`` of docs/samplers.md §2).

    ``floor(seq_len * ratio)``, clipped to ``[1, num_masked - 1]`` so every step reveals at least one
    token and at least one stays masked until the last step (which reveals everything).
    """
    wanted = int(torch.floor(seq_len * mask_ratio(schedule, step_index, num_steps)).item())
    return max(1, min(num_masked - 1, wanted))


def guidance_scale(schedule: str, guidance: float, step_index: int, num_steps: int) -> float:
    """CFG scale of step ``step_index``: ``constant`` s (Meissonic), or ``linear``, MaskGIT's ramp.

    MaskGIT mixes ``(1 + w_k) c - w_k u`` with ``w_k = w k/(S-1)``; in our ``u + s (c - u)`` form that is
    ``s_i = 1 + (s - 1) i/(T-1)``: the plain conditional at the first step, ``s`` at the last.
    """
    if schedule == "constant":
        return guidance
    if schedule == "linear":
        return 1.0 + (guidance - 1.0) * (step_index / (num_steps - 1) if num_steps > 1 else 1.0)
    raise ValueError(f"unknown guidance schedule {schedule!r}; choose constant or linear")
