"""aMUSEd's cached-context forward (ReCAP, arXiv 2505.19089; :mod:`mgt.efficient.recap`).

``UVit2DModel`` wraps its stack of ``BasicTransformerBlock``s (self-attention, cross-attention to the text,
feed-forward) in convolutional down and up blocks whose ConvNeXt layers mix neighbouring positions, so only the
stack runs cached: a full forward records every layer's self-attention keys and values and the stack's output;
a local forward runs the convolutional stem on the whole grid, the stack on the query positions only (a 2x2
patch each when the model down-samples) against the recorded keys and values with their own fresh ones in
place, puts their outputs into the recorded stack output and runs the up block and the output layer on the
whole grid. The stack holds most of the model's FLOPs (22 of its layers at width 1024 in aMUSEd-256).

The processor follows diffusers 0.42.1 ``AttnProcessor2_0`` on the path ``BasicTransformerBlock.attn1`` takes
(no group or spatial norm, no mask, no residual), so a full forward through it equals the plain forward.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding

from mgt.efficient.recap import (
    ContextSlot,
    LayerCache,
    LocalLogits,
    gather_rows,
    query_positions,
    repeat_for_guidance,
    with_fresh,
)


class CachedSelfAttnProcessor:
    """Self-attention that records its keys and values (``fresh_rows`` None) or runs its input rows as queries
    against the recorded ones with their fresh keys and values at ``fresh_rows`` `(batch, n)`."""

    def __init__(self, slot: ContextSlot, layer: int, fresh_rows: torch.Tensor | None):
        self.slot, self.layer, self.fresh_rows = slot, layer, fresh_rows

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim)  # (batch, seq, heads, head_dim), the cache's layout
        value = value.view(batch, -1, attn.heads, head_dim)
        if self.fresh_rows is None:
            self.slot.layers.append(LayerCache(key, value))
        else:
            cache = self.slot.layers[self.layer]
            key = with_fresh(cache.key, key, self.fresh_rows)
            value = with_fresh(cache.value, value, self.fresh_rows)
        key, value = key.transpose(1, 2), value.transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


@contextmanager
def _processors(transformer, slot: ContextSlot, fresh_rows: torch.Tensor | None):
    layers = list(transformer.transformer_layers)
    originals = [layer.attn1.processor for layer in layers]
    for index, layer in enumerate(layers):
        layer.attn1.processor = CachedSelfAttnProcessor(slot, index, fresh_rows)
    try:
        yield
    finally:
        for layer, processor in zip(layers, originals):
            layer.attn1.processor = processor


def amused_cached_forward(transformer, token_ids, encoder_hidden_states, pooled_projections, micro_conds,
                          timestep, slot: ContextSlot, queries: torch.Tensor | None):
    """Full forward recording into ``slot`` (``queries`` None) -> `(batch, codebook, h, w)` logits, or local
    forward of the positions holding a ``queries`` `(batch // r, h, w)` token (r = 2 under CFG) -> LocalLogits
    over every token (the up block mixes neighbours, so all logits are fresh)."""
    if queries is None:
        slot.layers.clear()
        handle = transformer.project_from_hidden_norm.register_forward_pre_hook(
            lambda module, args: slot.extras.__setitem__("stack_output", args[0]))
        try:
            with _processors(transformer, slot, None):
                return transformer(token_ids, encoder_hidden_states, pooled_projections, micro_conds)
        finally:
            handle.remove()
    return _local_forward(transformer, token_ids, encoder_hidden_states, pooled_projections, micro_conds, slot,
                          queries)


def _local_forward(transformer, token_ids, encoder_hidden_states, pooled_projections, micro_conds, slot, queries):
    """``UVit2DModel.forward`` (diffusers 0.42.1) with the transformer stack on the query positions only."""
    config = transformer.config
    encoder_hidden_states = transformer.encoder_proj_layer_norm(transformer.encoder_proj(encoder_hidden_states))
    micro = get_timestep_embedding(micro_conds.flatten(), config.micro_cond_encode_dim, flip_sin_to_cos=True,
                                   downscale_freq_shift=0).reshape(token_ids.shape[0], -1)
    pooled = torch.cat([pooled_projections, micro], dim=1).to(dtype=transformer.dtype)
    pooled = transformer.cond_embed(pooled).to(encoder_hidden_states.dtype)
    hidden = transformer.down_block(transformer.embed(token_ids), pooled_text_emb=pooled,
                                    encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=None)
    batch, channels, height, width = hidden.shape
    hidden = hidden.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
    hidden = transformer.project_to_hidden(transformer.project_to_hidden_norm(hidden))

    patch = token_ids.shape[1] // height
    positions = repeat_for_guidance(query_positions(queries, patch), batch)
    hidden = gather_rows(hidden, positions)
    with _processors(transformer, slot, positions):
        for layer in transformer.transformer_layers:
            hidden = layer(hidden, encoder_hidden_states=encoder_hidden_states,
                           added_cond_kwargs={"pooled_text_emb": pooled})
    hidden = with_fresh(slot.extras["stack_output"], hidden, positions)

    hidden = transformer.project_from_hidden(transformer.project_from_hidden_norm(hidden))
    hidden = hidden.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    hidden = transformer.up_block(hidden, pooled_text_emb=pooled, encoder_hidden_states=encoder_hidden_states,
                                  cross_attention_kwargs=None)
    logits = transformer.mlm_layer(hidden)  # (batch, C, h, w)
    index = torch.arange(token_ids[0].numel(), device=logits.device).expand(queries.shape[0], -1)
    return LocalLogits(logits.flatten(2)[..., None], index)
