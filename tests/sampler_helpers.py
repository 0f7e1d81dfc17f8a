"""Helpers of the sampler tests: a stand-in CFG model over a tiny token grid, so sampling runs without weights."""

from __future__ import annotations

import torch

CODES, SIDE, MASK = 32, 8, 32  # codebook size, grid side, mask id


def stand_in(prompts):
    """A fake CFG model: each row's guided logits depend only on its prompt id, its own tokens, t and s.

    Returns `predict(tokens (B, h, w), t, s) -> (B, h*w, C)`, bitwise identical for a sample whatever its
    batch, and a list that records `(t, s, masked count per sample)` of every call. Under cached-context steps
    (``context``) it computes every position, as if the cache were exact.
    """
    calls = []

    def predict(tokens, step_value, scale, context=None):
        calls.append((step_value, scale, (tokens == MASK).flatten(1).sum(-1).tolist()))
        rows = []
        for prompt, row in zip(prompts, tokens.flatten(1)):
            g = torch.Generator().manual_seed(1000 * prompt + step_value)
            uncond, cond = torch.randn(2, row.numel(), CODES, generator=g) * 2
            cond = cond + (row.remainder(5).float() * 0.4)[:, None]
            rows.append(cond.sub(uncond).mul_(scale).add_(uncond))
        return torch.stack(rows)

    return predict, calls
