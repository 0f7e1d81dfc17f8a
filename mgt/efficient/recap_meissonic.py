"""Meissonic's cached-context forward (ReCAP, arXiv 2505.19089; :mod:`mgt.efficient.recap`).

A full forward is :meth:`MeissonicTransformer.forward` with a recording attention processor on every dual- and
single-stream block: it keeps each layer's keys (after RMS norm and RoPE) and values over ``[text; image]``.
A local forward embeds only the query positions (a 2x2 token patch each in the 1024-style model: the down
block's 2x2 convolution and the up block's 2x2 transpose convolution both act within one patch, so a patch is
computed exactly from its own four tokens), runs their image stream through every block against the recorded
keys and values with their own fresh ones in place, and returns logits for the patches' tokens. The text stream
is not re-run: its keys and values are the recorded ones.

The processor and block bodies follow diffusers 0.42.1 ``transformer_flux.py`` (``FluxAttnProcessor``,
``FluxTransformerBlock.forward``, ``FluxSingleTransformerBlock.forward``) line for line, so a full forward
through this module equals the plain forward bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from mgt.efficient.recap import (
    ContextSlot,
    LayerCache,
    LocalLogits,
    attend,
    gather_rows,
    patch_token_index,
    query_positions,
    repeat_for_guidance,
    with_fresh,
)


class RecordingFluxProcessor(FluxAttnProcessor):
    """``FluxAttnProcessor`` that also appends the layer's post-RoPE keys and values to ``slot.layers``."""

    def __init__(self, slot: ContextSlot):
        super().__init__()
        self.slot = slot

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = _rotate(query, *image_rotary_emb)
            key = _rotate(key, *image_rotary_emb)
        self.slot.layers.append(LayerCache(key, value))
        hidden_states = attend(query, key, value).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb`` (use_real, unbind -1) for `(batch, seq, heads, dim)` ``x``; ``cos``/``sin``
    are `(seq, dim)` or per row `(batch, seq, dim)`."""
    cos = cos[None, :, None, :] if cos.dim() == 2 else cos[:, :, None, :]
    sin = sin[None, :, None, :] if sin.dim() == 2 else sin[:, :, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos.to(x.device) + rotated.float() * sin.to(x.device)).to(x.dtype)


@contextmanager
def _recording(transformer, slot: ContextSlot):
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    originals = [block.attn.processor for block in blocks]
    for block in blocks:
        block.attn.processor = RecordingFluxProcessor(slot)
    try:
        yield
    finally:
        for block, processor in zip(blocks, originals):
            block.attn.processor = processor


def meissonic_cached_forward(transformer, token_ids, encoder_hidden_states, pooled_projections, micro_conds,
                             timestep, slot: ContextSlot, queries: torch.Tensor | None):
    """Full forward recording into ``slot`` (``queries`` None) -> `(batch, codebook, h, w)` logits, or local
    forward of the positions holding a ``queries`` `(batch // r, h, w)` token (r = 2 under CFG) -> LocalLogits."""
    if queries is None:
        slot.layers.clear()
        with _recording(transformer, slot):
            return transformer(token_ids, encoder_hidden_states, pooled_projections, micro_conds, timestep)
    return _local_forward(transformer, token_ids, pooled_projections, micro_conds, timestep, slot, queries)


def _local_forward(transformer, token_ids, pooled_projections, micro_conds, timestep, slot, queries):
    batch, height, width = token_ids.shape
    patch = 2 if transformer.down_block.downsample is not None else 1
    positions = repeat_for_guidance(query_positions(queries, patch), batch)  # (batch, n)
    count = positions.shape[1]
    patches = token_ids.view(batch, height // patch, patch, width // patch, patch).permute(0, 1, 3, 2, 4)
    patches = gather_rows(patches.reshape(batch, -1, patch, patch), positions).reshape(-1, patch, patch)

    hidden = transformer.down_block(transformer.embed(patches))  # (batch * n, D, 1, 1)
    hidden = hidden.reshape(batch, count, -1)
    hidden = transformer.project_to_hidden(transformer.project_to_hidden_norm(hidden))
    temb = _time_embedding(transformer, pooled_projections, micro_conds, timestep, hidden.dtype)

    text_len = slot.layers[0].key.shape[1] - (height // patch) * (width // patch)
    cols = width // patch
    ids = torch.stack([torch.zeros_like(positions), positions // cols, positions % cols], -1)  # image_rope_ids
    cos, sin = transformer.pos_embed(ids.reshape(-1, 3))
    rope = (cos.view(batch, count, -1), sin.view(batch, count, -1))
    fresh_rows = positions + text_len  # the queries' rows in the recorded [text; image] sequence

    layers = iter(slot.layers)
    for block in transformer.transformer_blocks:
        hidden = _dual_local(block, hidden, temb, rope, next(layers), fresh_rows)
    for block in transformer.single_transformer_blocks:
        hidden = _single_local(block, hidden, temb, rope, next(layers), fresh_rows)

    hidden = transformer.project_from_hidden(transformer.project_from_hidden_norm(hidden))
    hidden = transformer.up_block(hidden.reshape(batch * count, -1, 1, 1))
    logits = transformer.mlm_layer(hidden)  # (batch * n, C, patch, patch)
    logits = logits.reshape(batch, count, -1, patch * patch).transpose(1, 2)  # (batch, C, n, patch**2)
    index = patch_token_index(positions[: queries.shape[0]], width, patch)
    return LocalLogits(logits, index)


def _time_embedding(transformer, pooled_projections, micro_conds, timestep, dtype):
    """``temb`` exactly as :meth:`MeissonicTransformer.forward` builds it (step value cast, then x 1000)."""
    batch = micro_conds.shape[0]
    micro = get_timestep_embedding(micro_conds.flatten(), 256, flip_sin_to_cos=True,
                                   downscale_freq_shift=0).reshape(batch, -1)
    pooled = torch.cat([pooled_projections, micro], dim=1).to(transformer.dtype)
    pooled = transformer.cond_embed(pooled).to(dtype)
    return transformer.time_text_embed(timestep.to(dtype) * 1000, pooled)


def _attention_local(attn, normed, rope, cache: LayerCache, fresh_rows) -> torch.Tensor:
    query, key, value = attn.to_q(normed), attn.to_k(normed), attn.to_v(normed)
    query = _rotate(attn.norm_q(query.unflatten(-1, (-1, attn.head_dim))), *rope)
    key = _rotate(attn.norm_k(key.unflatten(-1, (-1, attn.head_dim))), *rope)
    value = value.unflatten(-1, (-1, attn.head_dim))
    keys = with_fresh(cache.key, key, fresh_rows)
    values = with_fresh(cache.value, value, fresh_rows)
    return attend(query, keys, values).flatten(2, 3).to(query.dtype)


def _dual_local(block, hidden, temb, rope, cache, fresh_rows):
    """The image stream of ``FluxTransformerBlock.forward`` for the query rows only."""
    normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden, emb=temb)
    attn_output = _attention_local(block.attn, normed, rope, cache, fresh_rows)
    attn_output = block.attn.to_out[1](block.attn.to_out[0](attn_output.contiguous()))
    hidden = hidden + gate_msa.unsqueeze(1) * attn_output
    normed = block.norm2(hidden) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return hidden + gate_mlp.unsqueeze(1) * block.ff(normed)


def _single_local(block, hidden, temb, rope, cache, fresh_rows):
    """``FluxSingleTransformerBlock.forward`` for the query rows only (the text rows are in the cache)."""
    normed, gate = block.norm(hidden, emb=temb)
    mlp = block.act_mlp(block.proj_mlp(normed))
    attn_output = _attention_local(block.attn, normed, rope, cache, fresh_rows)
    out = hidden + gate.unsqueeze(1) * block.proj_out(torch.cat([attn_output, mlp], dim=2))
    return out.clip(-65504, 65504) if out.dtype == torch.float16 else out
