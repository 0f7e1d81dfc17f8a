"""MaskGIT's cached-context forward (ReCAP, arXiv 2505.19089; :mod:`mgt.efficient.recap`).

:class:`mgt.models.maskgit.MaskGitTransformer` runs image tokens then one class token through per-position layers
(embedding, first and last projections, pre-norm MLPs, the output product) and self-attention, so a local forward
runs the query positions through every layer: only the attention sees the others, through the keys and values
the full forward recorded. The class token is context like any known token. ReCAP's own MaskGIT code
(github.com/liebenxj/ReCAP @ 4d1da38, ``examples/MaskGIT+ReCAP/models/uvit.py``) caches the same pairs.

The attention repeats, op for op, the path ``nn.MultiheadAttention`` takes in the transformer (batch first,
packed in-projection, ``need_weights=True``: ``torch.nn.functional.multi_head_attention_forward``'s
``bmm``-softmax-``bmm``), so a full forward through it gives the plain forward's logits bit for bit and every-step-full
schedules keep vanilla's tokens. Its cached keys and values keep torch's `(batch * heads, seq, head_dim)` layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mgt.efficient.recap import (
    ContextSlot,
    LayerCache,
    LocalLogits,
    gather_rows,
    query_positions,
    repeat_for_guidance,
    with_fresh,
)


def _attention(mha: torch.nn.MultiheadAttention, x: torch.Tensor, slot: ContextSlot, layer: int,
               fresh_rows: torch.Tensor | None) -> torch.Tensor:
    """Self-attention of the rows ``x`` `(batch, n, width)`: recording every key and value (``fresh_rows`` None,
    ``x`` the whole sequence), or as queries against the recorded ones with their own at ``fresh_rows``."""
    batch, length, width = x.shape
    heads = mha.num_heads
    head_dim = width // heads
    projected = F.linear(x.transpose(1, 0), mha.in_proj_weight, mha.in_proj_bias)
    query, key, value = projected.unflatten(-1, (3, width)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    query, key, value = (t.view(length, batch * heads, head_dim).transpose(0, 1) for t in (query, key, value))
    if fresh_rows is None:
        slot.layers.append(LayerCache(key, value))
    else:
        rows = fresh_rows.repeat_interleave(heads, dim=0)  # (batch * heads, n): torch's head-major batch order
        cache = slot.layers[layer]
        key, value = with_fresh(cache.key, key, rows), with_fresh(cache.value, value, rows)
    weights = torch.softmax(torch.bmm(query * math.sqrt(1.0 / float(head_dim)), key.transpose(-2, -1)), dim=-1)
    out = torch.bmm(weights, value).transpose(0, 1).reshape(length * batch, width)
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias).view(length, batch, width).transpose(1, 0)


def maskgit_cached_forward(transformer, token_ids: torch.Tensor, class_labels: torch.Tensor,
                           drop_label: torch.Tensor | None, timestep, slot: ContextSlot,
                           queries: torch.Tensor | None):
    """Full forward recording into ``slot`` (``queries`` None) -> `(batch, codebook + 1, side, side)` logits, as
    :meth:`MaskGitTransformer.forward` returns them; or local forward of the ``queries`` `(batch // r, side, side)`
    tokens (r = 2 under CFG) -> :class:`LocalLogits` at those tokens only."""
    config = transformer.config
    batch, rows, cols = token_ids.shape
    if (rows, cols) != (config.tokens_per_side, config.tokens_per_side):
        return transformer(token_ids, class_labels, drop_label, timestep)  # raises its own shape error
    cls_token = class_labels.view(batch, 1) + config.codebook_size + 1
    if drop_label is not None:
        cls_token = torch.where(drop_label.view(batch, 1), transformer.no_class_id, cls_token)
    x = transformer.tok_emb(torch.cat([token_ids.view(batch, -1), cls_token], -1)) + transformer.pos_emb
    positions = None
    if queries is None:
        slot.layers.clear()
    else:
        positions = repeat_for_guidance(query_positions(queries, 1), batch)
        x = gather_rows(x, positions)
    x = transformer.first_layer(x)
    for index, (attention, feed_forward) in enumerate(transformer.transformer.layers):
        x = x + _attention(attention.fn.mha, attention.norm(x), slot, index, positions)
        x = x + feed_forward(x)
    x = transformer.last_layer(x)
    codes = config.codebook_size + 1
    if positions is None:
        logits = (torch.matmul(x, transformer.tok_emb.weight.T) + transformer.bias)[:, :rows * cols, :codes]
        return logits.transpose(1, 2).reshape(batch, -1, rows, cols)
    logits = torch.matmul(x, transformer.tok_emb.weight[:codes].T) + transformer.bias[positions, :codes]
    return LocalLogits(logits.transpose(1, 2)[..., None], positions[:queries.shape[0]])
