"""The sampler's side of cached-context steps (ReCAP, arXiv 2505.19089; config: ``SamplerConfig.cache``).

ReCAP (github.com/liebenxj/ReCAP @ 4d1da38, ``examples/MaskGIT+ReCAP/cache_decoding.py``) groups the steps: a
full forward picks by confidence the tokens revealed over the group and caches every layer's keys and values;
the group's local forwards run only those tokens as queries against the cached context. The vanilla sampler
re-draws every masked position at each step and re-masks by confidence; here it keeps doing that, over the
positions a local step computes:

- ``queries="group"`` (ReCAP): at a full step, of the positions still masked after it, the ``m_j`` of lowest
  re-masking confidence are *held* (``m_j``: the schedule's masked count after the group's last step ``j``);
  the group's local steps compute the other positions masked at the full step, re-draw the masked ones among
  them and re-mask by confidence, while the held ones stay masked (confidence -inf). The first step after the
  group is full again.
- ``queries="masked"``: nothing is held; local steps compute every position masked at the last full step.

Tokens known at the full step are context: their keys and values come from the cache. A local step's logits at
positions it does not compute are the last full step's (only differential sampling's ranking reads them; the
draw keeps known tokens and held positions stay masked). Z-Sampling's zigzag steps run full, since its
inversion pass re-masks decoded context (docs/efficiency.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mgt.sampling.sampler_config import CachedContextConfig


@dataclass
class ContextRequest:
    """What the sampler asks of the predictor at a cached-context step.

    Attributes:
        slots: the recorded keys and values, one :class:`mgt.efficient.recap.ContextSlot` per micro-batch,
            owned by the predictor (keyed as it likes) and kept from one step to the next.
        queries: `(B, h, w)` bool, the tokens a local forward computes; None for a full forward that records.
        out: `(B, L, C)` float32 logits to return from a local forward, with the computed tokens overwritten.
    """

    slots: dict = field(default_factory=dict)
    queries: torch.Tensor | None = None
    out: torch.Tensor | None = None


class CachedContext:
    """One generation's cached-context state: which steps are full, the group and held positions, the cache."""

    def __init__(self, config: CachedContextConfig, num_steps: int, zigzag_steps: int, grid: tuple[int, int],
                 patch: int = 1):
        self.config, self.num_steps, self.zigzag_steps = config, num_steps, zigzag_steps
        self.grid, self.patch = grid, patch
        self.slots: dict = {}
        self.last_logits: torch.Tensor | None = None  # (B, L, C) guided logits of the last full forward
        self.group: torch.Tensor | None = None  # (B, L) bool, the tokens local steps compute
        self.held: torch.Tensor | None = None  # (B, L) bool, kept masked until the next full step
        self.full_now = True  # whether the current step's forward was a full one
        self.full_forwards = 0
        self.local_forwards = 0

    def is_full(self, step_index: int) -> bool:
        first = max(self.config.full_first, self.zigzag_steps)
        return step_index < first or (step_index - first) % self.config.full_every == 0

    def group_end(self, step_index: int) -> int:
        """The last step served by the full forward of ``step_index``."""
        end = step_index
        while end + 1 < self.num_steps and not self.is_full(end + 1):
            end += 1
        return end

    def logits(self, predict, tokens: torch.Tensor, step_value: int, scale: float, step_index: int) -> torch.Tensor:
        """The step's guided `(B, L, C)` logits: a recording full forward or a local one (see the module doc)."""
        self.full_now = self.is_full(step_index) or self.last_logits is None  # an edit may start mid-group
        if self.full_now:
            logits = predict(tokens, step_value, scale, context=ContextRequest(self.slots))
            self.last_logits = logits.clone()  # the sampler modifies the step's logits in place
            self.full_forwards += 1
            return logits
        self.local_forwards += 1
        request = ContextRequest(self.slots, self.group.view(tokens.shape), self.last_logits.clone())
        return predict(tokens, step_value, scale, context=request)

    def mask_counts(self, num_to_mask: list[int]) -> list[int]:
        """A local step never masks fewer tokens than it holds (the schedule's clamp can ask for fewer)."""
        if self.full_now or self.held is None:
            return num_to_mask
        return [max(n, int(h)) for n, h in zip(num_to_mask, self.held.sum(-1).tolist())]

    @property
    def held_now(self) -> torch.Tensor | None:
        """`(B, L)` bool positions the current step's re-mask keeps masked (None at a full step)."""
        return None if self.full_now else self.held

    def choose_group(self, unknown: torch.Tensor, masked: torch.Tensor, confidence: torch.Tensor,
                     counts_after_group: list[int], step_index: int) -> None:
        """After a full step's re-mask: hold the ``counts_after_group[b]`` masked tokens of lowest confidence
        (``queries="group"``) and make the rest of ``unknown`` (masked before the step) the local steps' queries.

        Args:
            unknown: `(B, L)` bool, masked before the step; masked: `(B, L)` bool, masked after it.
            confidence: `(B, L)` float32 re-masking confidences of the step.
            counts_after_group: the schedule's masked count after the group's last step, per sample.
        """
        end = self.group_end(step_index)
        self.held = torch.zeros_like(masked)
        if self.config.queries == "group" and step_index < end < self.num_steps - 1:
            for b, count in enumerate(counts_after_group):
                self.held[b] = self._hold(confidence[b], masked[b], count)
        self.group = unknown & ~self.held

    def _hold(self, confidence: torch.Tensor, masked: torch.Tensor, count: int) -> torch.Tensor:
        """`(L,)` bool: at most ``count`` masked tokens, whole ``patch`` x ``patch`` patches of lowest best
        confidence first, so the group's tokens share patches (a patch is one transformer position: holding a
        token costs nothing while a patch-mate runs)."""
        p, (height, width) = self.patch, self.grid
        def patches(x):
            return x.view(height // p, p, width // p, p).transpose(1, 2).reshape(-1, p * p)
        best = patches(confidence.masked_fill(~masked, -torch.inf)).amax(-1)
        sizes = patches(masked).sum(-1)
        order = torch.argsort(best.masked_fill(sizes == 0, torch.inf), stable=True)
        taken = order[torch.cumsum(sizes[order], 0) <= count]
        held = torch.zeros_like(sizes, dtype=torch.bool)
        held[taken] = True
        held = held[:, None].expand(-1, p * p).reshape(height // p, width // p, p, p).transpose(1, 2)
        return held.reshape(-1) & masked
