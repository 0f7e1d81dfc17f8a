"""Masked Z-Sampling, arXiv 2411.10781 §3 (Enhanced Inference): zigzag between denoising and inversion.

The discrete analogue of Z-Sampling (arXiv 2412.10891). Released algorithm
(github.com/xie-lab-ml/Bags_of_Tricks_Meissonic @ 6beeec1, ``--method zigzag``; docs/samplers.md §5), for each step
``i < lambda`` (default ``lambda = T-1``):

1. forward: ``x' = Step(x_i, t_i; s)``, the ordinary step with every other technique on;
2. inversion: the model on ``x'`` at ``t_{i+1}`` with the weak CFG scale ``s_inv`` (default 0: the negative-prompt
   branch only), ``kappa_j = max_v q_j(v)``, no other technique;
3. re-mask the ``revealed - 1`` known tokens of ``x'`` with the highest ``kappa`` (the prompt-agnostic ones);
4. re-denoise: ``x_{i+1} = Step(x'', t_i; s)`` with the vanilla step's mask count, so the mask schedule is
   unchanged. NFE = T + 2 lambda (3T - 2 by default).

The reference counts the re-mask set over the whole batch (batch 1 only); here it is per sample, and the
``random`` rule draws from each sample's generator. The alternatives of docs/samplers.md §5 are options.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mgt.sampling.sampler_config import MaskedZSamplingConfig


class MaskedZSampling:
    """arXiv 2411.10781 §3: re-mask after each forward step by the inversion pass's confidence, then re-denoise.

    Args:
        inversion_cfg: ``s_inv``, the CFG scale of the inversion pass (0 = unconditional branch only).
        num_steps: ``lambda``, zigzag on steps ``0..lambda-1``; None means ``T-1``.
        remask_rule: ``top_conf_all`` (released code), ``low_conf_all``, ``top_conf_new`` or ``random``.
        remask_count: ``revealed-1`` (released code) or ``revealed``.
    """

    def __init__(self, inversion_cfg: float = 0.0, num_steps: int | None = None,
                 remask_rule: str = "top_conf_all", remask_count: str = "revealed-1"):
        rules = ("top_conf_all", "low_conf_all", "top_conf_new", "random")
        if remask_rule not in rules:
            raise ValueError(f"unknown remask_rule {remask_rule!r}; choose one of {', '.join(rules)}")
        if remask_count not in ("revealed-1", "revealed"):
            raise ValueError(f"unknown remask_count {remask_count!r}; choose revealed-1 or revealed")
        self.inversion_cfg, self.num_steps = inversion_cfg, num_steps
        self.remask_rule, self.remask_count = remask_rule, remask_count

    @classmethod
    def from_config(cls, config: MaskedZSamplingConfig) -> MaskedZSampling:
        return cls(config.inversion_cfg, config.num_steps, config.remask_rule, config.remask_count)

    def zigzag_steps(self, total_steps: int) -> int:
        """``lambda`` for a generation of ``total_steps`` steps; the last step can never zigzag."""
        steps = total_steps - 1 if self.num_steps is None else self.num_steps
        if steps > total_steps - 1:
            raise ValueError(f"zsampling.num_steps={self.num_steps} is more than T-1={total_steps - 1} (the last "
                             f"step cannot zigzag); lower it or leave it unset for T-1")
        return steps

    def remask(
        self,
        before: torch.Tensor,
        forward: torch.Tensor,
        inversion_logits: torch.Tensor,
        generators: Sequence[torch.Generator],
        mask_token_id: int,
        editable: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The forward step's tokens with ``n`` more known tokens per sample set back to ``[MASK]``.

        Args:
            before: `(B, L)` tokens entering the step.
            forward: `(B, L)` tokens after the forward step.
            inversion_logits: `(B, L, C)` float32 guided logits of the inversion pass; overwritten.
            generators: one per sample, used by the ``random`` rule only.
            editable: `(B, L)` bool, the positions that may be re-masked (None: all). An edit's kept tokens
                are never candidates, so they never change.

        Returns:
            `(B, L)` tokens with ``revealed - 1`` (or ``revealed``) of the known tokens re-masked.
        """
        kappa = self.max_probability_(inversion_logits)
        known, was_masked = forward != mask_token_id, before == mask_token_id
        out = forward.clone()
        for b, generator in enumerate(generators):
            revealed = known[b] & was_masked[b]
            count = int(revealed.sum()) - (1 if self.remask_count == "revealed-1" else 0)
            if count <= 0:
                continue
            candidates = revealed if self.remask_rule == "top_conf_new" else known[b]
            if editable is not None:
                candidates = candidates & editable[b]
            if self.remask_rule == "random":
                score = torch.rand(kappa.shape[1], generator=generator, device=generator.device).to(kappa.device)
            else:
                score = -kappa[b] if self.remask_rule == "low_conf_all" else kappa[b]
            chosen = torch.topk(score.masked_fill(~candidates, -torch.inf), count).indices
            out[b, chosen] = mask_token_id
        return out

    @staticmethod
    def max_probability_(logits: torch.Tensor) -> torch.Tensor:
        """`(B, L, C)` logits -> `(B, L)` ``max_v softmax(logits)_v = 1 / sum_v exp(l_v - max l)``, in place."""
        top = logits.amax(-1, keepdim=True)
        return logits.sub_(top).exp_().sum(-1).reciprocal_()
