"""Cached-context forwards (ReCAP, arXiv 2505.19089): the pieces every family's hooks share.

A *full* forward runs every position and records, per attention layer, the keys and values of every position
(image and text); a *local* forward runs only the query positions through every block, each attending to the
recorded keys and values of the other positions plus the fresh ones of the queries. Reference:
github.com/liebenxj/ReCAP @ 4d1da38 (``examples/MaskGIT+ReCAP/models/uvit.py``: ``past_kvs``; the caller
slices the cache to the non-query positions and concatenates the fresh keys). Here the fresh keys *replace*
the recorded ones at the query positions, which is the same set of keys without a gather per layer.

A family exposes ``cached_forward(transformer, token_ids, *conditioning, timestep, slot, queries)``
(:class:`mgt.models.families.ModelFamily`): ``queries`` None is a full forward that fills ``slot``; a
`(batch, h, w)` bool mask is a local forward that returns :class:`LocalLogits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn


@dataclass
class LayerCache:
    """The keys and values one attention layer saw at the last full forward: `(batch, seq, heads, head_dim)`."""

    key: torch.Tensor
    value: torch.Tensor


@dataclass
class ContextSlot:
    """What a full forward of one micro-batch recorded: one :class:`LayerCache` per attention layer, in call
    order, plus anything else a family's local forward reuses (``extras``)."""

    layers: list[LayerCache] = field(default_factory=list)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LocalLogits:
    """A local forward's logits: `(batch, codebook, n, k)` at the tokens ``index`` `(batch, n * k)` (row-major
    positions in the token grid), ``n`` query positions of ``k`` tokens each (a 2x2 patch: k = 4)."""

    logits: torch.Tensor
    index: torch.Tensor


def query_positions(queries: torch.Tensor, patch: int) -> torch.Tensor:
    """`(batch, n)` int64 indices of the transformer positions (``patch`` x ``patch`` token patches, row-major)
    holding at least one query token of ``queries`` `(batch, h, w)` bool.

    Rows with fewer query positions than the longest one are padded with their first non-query positions (a
    batch runs one shape), so a padded row recomputes a few more positions than it needs; with
    ``micro_batch=1`` no row is padded.
    """
    batch, height, width = queries.shape
    per_patch = queries.view(batch, height // patch, patch, width // patch, patch).any(4).any(2).flatten(1)
    count = int(per_patch.sum(1).max())
    # stable sort puts the query positions first, each group in index order
    order = torch.sort((~per_patch).to(torch.int8), dim=1, stable=True).indices
    return order[:, :max(count, 1)]


def patch_token_index(positions: torch.Tensor, width: int, patch: int) -> torch.Tensor:
    """`(batch, n * patch**2)` token indices of the patches ``positions`` `(batch, n)`, each patch's tokens
    row-major (the order of a conv-transpose output's ``(dy, dx)``)."""
    cols = width // patch
    rows, cols_ = positions // cols, positions % cols
    dy = torch.arange(patch, device=positions.device).repeat_interleave(patch)
    dx = torch.arange(patch, device=positions.device).repeat(patch)
    token_rows = rows[..., None] * patch + dy
    token_cols = cols_[..., None] * patch + dx
    return (token_rows * width + token_cols).flatten(1)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for `(batch, seq, ...)` ``x`` and `(batch, n)` ``index``."""
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, expanded)


def with_fresh(cached: torch.Tensor, fresh: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A copy of ``cached`` `(batch, seq, ...)` whose rows ``index`` `(batch, n)` hold ``fresh`` `(batch, n, ...)`."""
    expanded = index.view(*index.shape, *([1] * (cached.dim() - 2))).expand(-1, -1, *cached.shape[2:])
    return cached.scatter(1, expanded, fresh.to(cached.dtype))


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention on `(batch, seq, heads, head_dim)` tensors, as diffusers' processors call it
    (so a local forward with every position as a query matches the full forward)."""
    return dispatch_attention_fn(query, key, value)


def repeat_for_guidance(index: torch.Tensor, rows: int) -> torch.Tensor:
    """``index`` `(batch, n)` repeated to ``rows`` rows: a CFG forward runs ``[uncond; cond]`` with equal queries."""
    return index if rows == index.shape[0] else index.repeat(rows // index.shape[0], 1)
