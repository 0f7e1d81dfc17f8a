"""TomeMGT: ToMe-style token merging in Meissonic's dual-stream blocks (arXiv 2411.10781 §4).

An adaptation of ToMe for Stable Diffusion (tomesd, ``bipartite_soft_matching_random2d``) to the
MM-DiT blocks. Only the image-token stream of the dual-stream ``FluxTransformerBlock``s is merged;
text tokens and the single-stream blocks are untouched. Inside a block the AdaLN-normed image tokens
are merged, the image RoPE cos/sin tables are merged with the same mean, joint attention runs on the
shorter sequence, and the gated output is unmerged (each merged token receives its destination's
output) before the residual add; the feed-forward is wrapped the same way.

Choices where the reference left room (docs/samplers.md §7):

* The plan is recomputed at block 0 of every forward call and reused for ``reuse`` consecutive blocks
  (5 as released: blocks 0-4, 5-9, 10-13). The released code also reuses its last plan in block 0 of
  the *next* call; that quirk is not kept, since it makes an image depend on the previous call.
* The destination token of each 2x2 window is drawn from a ``torch.Generator`` seeded with
  ``(seed, step value)``, not from the global RNG and not from the batch parity as released (random
  for even batches, top-left otherwise). The choice is then a pure function of the step, identical for
  every sample of every batch, so a sample's image does not depend on its batch-mates.
* ``ratio == 0`` calls the blocks' own forward: exactly the unmerged model.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

WINDOW = 2  # s_x = s_y = 2: one destination token per 2x2 window
MAX_RATIO = 1 - 1 / WINDOW**2  # at most every source token of a window is merged


@dataclass
class MergePlan:
    """A bipartite merge plan for `(batch, N)` image tokens: ``N - r`` tokens remain.

    Attributes:
        src_positions: `(batch or 1, N - N_dst)` grid positions of the source tokens.
        dst_positions: `(batch or 1, N_dst)` grid positions of the destination tokens.
        unmerged: `(batch, N_src - r)` indices into the source set of the tokens kept as they are.
        merged: `(batch, r)` indices into the source set of the tokens merged away.
        targets: `(batch, r)` index of the destination each merged source goes into.
    """

    src_positions: torch.Tensor
    dst_positions: torch.Tensor
    unmerged: torch.Tensor
    merged: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self):
        # Every token's slot in the merged sequence [kept sources ; destinations]: merge is one scatter-add
        # (then a mean), unmerge one gather, whatever the number of blocks sharing the plan.
        batch, kept_len = self.unmerged.shape
        src = self.src_positions.expand(batch, -1)
        num_dst = self.dst_positions.shape[1]
        slots = torch.empty(batch, src.shape[1] + num_dst, dtype=torch.long, device=src.device)
        arange = torch.arange(kept_len + num_dst, device=src.device)
        slots.scatter_(1, src.gather(1, self.unmerged), arange[:kept_len].expand(batch, -1))
        slots.scatter_(1, self.dst_positions.expand(batch, -1), arange[kept_len:].expand(batch, -1))
        slots.scatter_(1, src.gather(1, self.merged), kept_len + self.targets)
        counts = torch.zeros(batch, kept_len + num_dst, device=src.device)
        counts.scatter_add_(1, slots, torch.ones(slots.shape, device=src.device))
        self.slots, self.inverse_counts = slots, counts.reciprocal_()[..., None]
        self.rope_cache: tuple | None = None  # (source tables, merged tables) of the blocks sharing this plan

    @property
    def removed(self) -> int:
        return self.merged.shape[1]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """`(batch, N, C)` -> `(batch, N - r, C)` = [unmerged sources ; destinations], merged by mean."""
        batch, _, channels = x.shape
        out = x.new_zeros(batch, self.inverse_counts.shape[1], channels)
        out.scatter_add_(1, self.slots[..., None].expand(batch, -1, channels), x)
        return out.mul_(self.inverse_counts.to(x.dtype))

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """`(batch, N - r, C)` -> `(batch, N, C)`: every merged source gets its destination's value."""
        return x.gather(1, self.slots[..., None].expand(-1, -1, x.shape[-1]))


def _take(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


def bipartite_plan(metric: torch.Tensor, rows: int, cols: int, removed: int,
                   generator: torch.Generator | None) -> MergePlan:
    """The ToMe plan: one destination per 2x2 window, the ``removed`` most similar sources merge into it.

    Args:
        metric: `(batch, rows*cols, C)` features compared by cosine similarity (the block-input image
            hidden states), row-major over the token grid.
        removed: r = floor(rho * N) tokens to merge away; at most the number of source tokens.
        generator: draws the destination of each window; None takes the top-left token.
    """
    batch, tokens, _ = metric.shape
    if rows * cols != tokens:
        raise ValueError(f"a {rows}x{cols} token grid has {rows * cols} tokens but the metric has {tokens}")
    win_rows, win_cols = rows // WINDOW, cols // WINDOW
    if generator is None:
        choice = torch.zeros(win_rows, win_cols, dtype=torch.long)
    else:
        choice = torch.randint(WINDOW * WINDOW, (win_rows, win_cols), generator=generator)
    # Grid positions of each window's destination; tokens of incomplete border windows stay sources.
    window_row = torch.arange(win_rows)[:, None] * WINDOW + choice // WINDOW
    window_col = torch.arange(win_cols)[None, :] * WINDOW + choice % WINDOW
    is_dst = torch.zeros(rows * cols, dtype=torch.bool)
    is_dst[(window_row * cols + window_col).flatten()] = True
    device = metric.device
    dst_positions = is_dst.nonzero()[:, 0].to(device)[None]
    src_positions = (~is_dst).nonzero()[:, 0].to(device)[None]
    removed = min(removed, src_positions.shape[1])

    metric = metric / metric.norm(dim=-1, keepdim=True)
    src = _take(metric, src_positions.expand(batch, -1))
    dst = _take(metric, dst_positions.expand(batch, -1))
    best_score, best_dst = (src @ dst.transpose(1, 2)).max(dim=-1)
    order = best_score.argsort(dim=-1, descending=True, stable=True)
    merged = order[:, :removed]
    return MergePlan(src_positions, dst_positions, unmerged=order[:, removed:], merged=merged,
                     targets=best_dst.gather(1, merged))


class TomeMGT:
    """Token merging for the dual-stream blocks of a Meissonic transformer (arXiv 2411.10781 §4).

    ``TomeMGT(ratio).apply(transformer)`` patches the forward of every ``FluxTransformerBlock`` in
    ``transformer.transformer_blocks`` (parameter names and weights are untouched) and registers a
    forward pre-hook on the transformer that starts a new plan group and records the step value.
    ``remove()`` restores the blocks' own forward.

    Args:
        ratio: rho, the share of image tokens merged away (r = floor(rho * N)); 0 is the unmerged model.
        reuse: consecutive dual-stream blocks served by one plan (5 as released; 1 recomputes per block).
        seed: seeds the destination choice together with the step value.
    """

    def __init__(self, ratio: float = 0.25, reuse: int = 5, seed: int = 0):
        if not 0 <= ratio <= MAX_RATIO:
            raise ValueError(f"TomeMGT ratio {ratio} is outside [0, {MAX_RATIO}] (2x2 windows keep one token "
                             "each); the paper's default is 0.25")
        if reuse < 1:
            raise ValueError(f"TomeMGT reuse {reuse} must be >= 1 (1 recomputes the plan in every block)")
        self.ratio, self.reuse, self.seed = float(ratio), int(reuse), int(seed)
        self.grid: tuple[int, int] | None = None  # (rows, cols) of the current forward's token grid
        self.step_value = 0
        self.plan: MergePlan | None = None
        self.last_lengths: list[int] = []  # image tokens seen by attention in each block of the last call
        self._handles: list = []
        self._blocks: list[FluxTransformerBlock] = []
        self._transformer: torch.nn.Module | None = None

    def apply(self, transformer: torch.nn.Module) -> TomeMGT:
        blocks = list(getattr(transformer, "transformer_blocks", []))
        if not blocks or not all(isinstance(b, FluxTransformerBlock) for b in blocks):
            raise ValueError(f"TomeMGT needs a Meissonic transformer (dual-stream FluxTransformerBlocks in "
                             f"transformer_blocks); {type(transformer).__name__} has none: use tome=0 for it")
        if getattr(transformer, "tome", None) is not None:
            raise ValueError("TomeMGT is already applied to this transformer; call transformer.tome.remove() first")
        self._handles.append(transformer.register_forward_pre_hook(self._start_call, with_kwargs=True))
        for index, block in enumerate(blocks):
            block.forward = types.MethodType(_make_forward(self, index), block)
        self._blocks = blocks
        transformer.tome = self
        self._transformer = transformer
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for block in self._blocks:
            del block.forward  # back to FluxTransformerBlock.forward
        self._handles, self._blocks = [], []
        self._transformer.tome = None

    def _start_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        names = ("token_ids", "encoder_hidden_states", "pooled_projections", "micro_conds", "timestep")
        inputs = {**dict(zip(names, args)), **kwargs}
        token_ids, timestep = inputs["token_ids"], inputs["timestep"]
        multiple = module.token_grid_multiple
        self.grid = (token_ids.shape[1] // multiple, token_ids.shape[2] // multiple)
        self.step_value = int(timestep.flatten()[0].item())
        self.plan = None
        self.last_lengths = []

    def plan_for(self, index: int, hidden_states: torch.Tensor) -> MergePlan:
        """The plan of block ``index``: recomputed from its input every ``reuse`` blocks."""
        if index % self.reuse == 0 or self.plan is None:
            rows, cols = self.grid
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step_value)
            removed = int(self.ratio * rows * cols)
            self.plan = bipartite_plan(hidden_states, rows, cols, removed, generator)
        return self.plan


def _make_forward(tome: TomeMGT, index: int):
    original = FluxTransformerBlock.forward

    def forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        if tome.ratio == 0 or image_rotary_emb is None:
            tome.last_lengths.append(hidden_states.shape[1])
            return original(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                            joint_attention_kwargs)
        return merged_block_forward(block, tome.plan_for(index, hidden_states), hidden_states,
                                    encoder_hidden_states, temb, image_rotary_emb, tome.last_lengths)

    return forward


def merged_block_forward(block: FluxTransformerBlock, plan: MergePlan, hidden_states: torch.Tensor,
                         encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                         image_rotary_emb: tuple[torch.Tensor, torch.Tensor],
                         lengths: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxTransformerBlock.forward`` with the image stream merged around attention and feed-forward.

    Args:
        hidden_states: `(batch, N, dim)` image tokens.
        encoder_hidden_states: `(batch, L, dim)` text tokens.
        temb: `(batch, dim)` time/text embedding.
        image_rotary_emb: (cos, sin), each `(L + N, head_dim)`, text positions first.
        lengths: if given, the merged image length is appended (for tests and benchmarks).
    """
    norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
    norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
        encoder_hidden_states, emb=temb)
    merged = plan.merge(norm_hidden)
    if lengths is not None:
        lengths.append(merged.shape[1])
    text_len = encoder_hidden_states.shape[1]
    if plan.rope_cache is None or plan.rope_cache[0] is not image_rotary_emb:
        plan.rope_cache = (image_rotary_emb, tuple(_merged_rope(t, plan, text_len, merged.shape[0])
                                                   for t in image_rotary_emb))
    rope = plan.rope_cache[1]
    attn_output, context_attn_output = _joint_attention(block.attn, merged, norm_context, rope)
    # Gates are per sample, not per token, so gating after the unmerge is the same and one pass cheaper.
    hidden_states = torch.addcmul(hidden_states, plan.unmerge(attn_output), gate_msa.unsqueeze(1))

    norm_hidden = torch.addcmul(shift_mlp[:, None], block.norm2(hidden_states), 1 + scale_mlp[:, None])
    hidden_states = torch.addcmul(hidden_states, plan.unmerge(block.ff(plan.merge(norm_hidden))),
                                  gate_mlp.unsqueeze(1))

    # The text stream is FluxTransformerBlock.forward's, unchanged (diffusers 0.42.1).
    encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
    norm_context = block.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * block.ff_context(norm_context)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _merged_rope(table: torch.Tensor, plan: MergePlan, text_len: int, batch: int) -> torch.Tensor:
    """`(L + N, D)` RoPE table -> `(batch, L + N - r, D)`: image rows merged with the plan's mean."""
    text, image = table[:text_len], table[text_len:]
    image = plan.merge(image.unsqueeze(0).expand(batch, -1, -1))
    return torch.cat([text.unsqueeze(0).expand(batch, -1, -1), image], dim=1)


def _joint_attention(attn, hidden: torch.Tensor, context: torch.Tensor,
                     rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' ``FluxAttnProcessor`` math with per-sample RoPE tables `(batch, S, head_dim)`.

    The processor only takes one `(S, head_dim)` table for the whole batch, but merged positions
    differ per sample; the rotation is element-wise per position, so folding the batch into the
    sequence axis lets diffusers' own ``apply_rotary_emb`` apply per-sample tables.
    """
    def split(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, attn.head_dim))

    query = torch.cat([attn.norm_added_q(split(attn.add_q_proj(context))), attn.norm_q(split(attn.to_q(hidden)))], 1)
    key = torch.cat([attn.norm_added_k(split(attn.add_k_proj(context))), attn.norm_k(split(attn.to_k(hidden)))], 1)
    value = torch.cat([split(attn.add_v_proj(context)), split(attn.to_v(hidden))], 1)
    batch, length = query.shape[:2]
    cos, sin = (t.reshape(batch * length, -1) for t in rope)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        return apply_rotary_emb(x.reshape(1, batch * length, *x.shape[2:]), (cos, sin), sequence_dim=1).reshape(x.shape)

    out = dispatch_attention_fn(rotate(query), rotate(key), value, attn_mask=None,
                                backend=attn.processor._attention_backend,
                                parallel_config=attn.processor._parallel_config)
    out = out.flatten(2, 3).to(query.dtype)
    context_out, image_out = out.split_with_sizes([context.shape[1], hidden.shape[1]], dim=1)
    image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
    return image_out, attn.to_add_out(context_out.contiguous())
