"""Differential sampling, arXiv 2411.10781 §3 (Enhanced Inference): resample stable tokens from p - P_prev.

Released algorithm (github.com/xie-lab-ml/Bags_of_Tricks_Meissonic @ 6beeec1, ``--low-entropy True``;
docs/samplers.md §4): per sample, rank every position j by ``KL(p_j || P_prev_j)`` over the previous sampler call's
distribution; for the ``Z`` most stable positions (smallest KL; ``Z = 0.75 N``) draw from ``max(p_j-P_prev_j,
1e-6)`` renormalised, and use that distribution for the re-masking confidence too. The state is reset at the
start of each generation (the reference's counter leaks it into the next image, docs/samplers.md §4); the first call
of a generation and the last step are left untouched. Under Z-Sampling, "previous" is the previous step call
(the inversion pass does not count).

Cost: no model call, a handful of fused in-place passes over `(N, K)`. The state is one `(N, K)` float32
distribution per sample (128 MiB at 4096 x 8192; twice that with ``store_modified_prev=False``, which keeps
the raw softmax apart from the one drawn from); the KL terms go into the step's logits buffer, which the
loop no longer needs after the softmax.
"""

from __future__ import annotations

import math

import torch

from mgt.sampling.sampler_config import DifferentialSamplingConfig

# P_prev is kept >= the smallest normal float32, so p / P_prev is never 0/0: a code where both underflowed adds
# 0 to the KL, and one where only P_prev did adds a huge term (+inf in the reference's kl_div). The draw is
# unaffected: a probability of 1e-38 never wins the multinomial draw.
_TINY = torch.finfo(torch.float32).tiny


class DifferentialSampling:
    """arXiv 2411.10781 §3: draw the ``z`` most stable positions from the normalised ``max(p - P_prev, floor)``.

    One object per generation: its state starts empty. Call it once per sampler step (forward and
    re-denoise steps under Z-Sampling) with the step's softmax.

    Args:
        ratio: ``z``, the share of positions modified (released code: 0.75 of all N).
        ratio_of: ``"all"`` positions (released code, known tokens included in the ranking) or only the
            ``"masked"`` ones.
        floor: lower bound of ``p - P_prev`` before renormalising (released code: 1e-6).
        store_modified_prev: keep the modified distribution as ``P_prev`` (released code, by aliasing) rather
            than the raw softmax.
    """

    def __init__(self, ratio: float = 0.75, ratio_of: str = "all", floor: float = 1e-6,
                 store_modified_prev: bool = True):
        if ratio_of not in ("all", "masked"):
            raise ValueError(f"unknown ratio_of {ratio_of!r}; choose all or masked")
        self.ratio, self.ratio_of, self.floor, self.store_modified_prev = ratio, ratio_of, floor, store_modified_prev
        self.prev: torch.Tensor | None = None  # (B, L, C) P_prev per sample
        self._spare: torch.Tensor | None = None  # (B, L, C) the modified p when the raw one is stored

    @classmethod
    def from_config(cls, config: DifferentialSamplingConfig) -> DifferentialSampling:
        return cls(config.ratio, config.ratio_of, config.floor, config.store_modified_prev)

    def __call__(self, probs: torch.Tensor, unknown: torch.Tensor, is_last_step: bool,
                 scratch: torch.Tensor) -> torch.Tensor:
        """The distributions to draw from and to score the confidence with.

        Args:
            probs: `(B, L, C)` float32 softmax of this step (after noise regularization). Not modified.
            unknown: `(B, L)` bool, positions masked before this step.
            is_last_step: the final step is left untouched, as in the released code.
            scratch: `(B, L, C)` float32 buffer that may be overwritten (the loop passes the spent logits).

        Returns:
            `(B, L, C)`: ``probs`` itself on the first call and the last step, else a buffer owned by this
            object (valid until the next call) holding ``probs`` with exactly ``Z`` rows per sample replaced.
        """
        if self.prev is None:
            self.prev = probs.clone().clamp_min_(_TINY)
            if not self.store_modified_prev:
                self._spare = torch.empty_like(probs)
            return probs
        if is_last_step:
            return probs
        out = self.prev if self.store_modified_prev else self._spare
        for b in range(probs.shape[0]):
            divergence = self.divergence(probs[b], self.prev[b], scratch[b])
            selected = self.select(divergence, unknown[b])
            self._modify(probs[b], self.prev[b], selected, out[b])
            if not self.store_modified_prev:
                torch.clamp_min(probs[b], _TINY, out=self.prev[b])
        return out

    @staticmethod
    def divergence(probs: torch.Tensor, prev: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """``KL(p_j || P_prev_j) = sum_v p log(p / P_prev)`` of every row: `(L, C)` x 3 -> `(L,)`.

        ``p / P_prev`` (written into ``scratch``) is floored at the smallest normal float32 before the log so
        that ``p = 0`` adds 0.
        """
        ratio = torch.div(probs, prev, out=scratch).clamp_min_(_TINY)
        return ratio.log_().mul_(probs).sum(-1)

    def select(self, divergence: torch.Tensor, unknown: torch.Tensor) -> torch.Tensor:
        """`(L,)` bool: the ``Z`` positions of smallest KL (the most stable ones)."""
        if self.ratio_of == "masked":
            count = int(self.ratio * int(unknown.sum()))
            divergence = divergence.masked_fill(~unknown, math.inf)
        else:
            count = int(self.ratio * divergence.numel())
        selected = torch.zeros_like(unknown)
        selected[torch.topk(divergence, count, largest=False).indices] = True
        return selected

    def _modify(self, probs: torch.Tensor, prev: torch.Tensor, selected: torch.Tensor, out: torch.Tensor) -> None:
        """``out = normalise(max(p - P_prev, floor))`` on selected rows, ``p`` elsewhere; ``out`` may be ``prev``.

        Whole-tensor in-place passes (few large ops beat many cache-sized ones when cores are shared); the
        unselected rows are computed too and then overwritten with ``p``.
        """
        torch.sub(probs, prev, out=out).clamp_min_(self.floor)
        out.div_(out.sum(-1, keepdim=True))
        keep = (~selected).nonzero()[:, 0]
        if keep.numel():
            out.index_copy_(0, keep, probs.index_select(0, keep).clamp_min_(_TINY))
