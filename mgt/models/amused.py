"""The aMUSEd family (arXiv 2401.01808, hub ``amused/amused-256`` / ``amused-512``): diffusers' ``UVit2DModel``
behind the engine's common transformer call, and its row of the family table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.models.unets.uvit_2d import UVit2DModel

from mgt.efficient.recap_amused import amused_cached_forward
from mgt.models.families import ModelFamily
from mgt.models.text import TEXT_SUBFOLDERS, TextConditioner, load_text_conditioner
from mgt.models.tiny import CODEBOOK, TEXT_WIDTH
from mgt.models.token_grid import TokenGridMixin


class AmusedTransformer(TokenGridMixin, UVit2DModel):
    """``UVit2DModel`` with the engine's forward signature; same config and parameter names.

    aMUSEd has no timestep input: ``timestep`` is accepted and ignored so every MGT is called alike.
    """

    def forward(
        self,
        token_ids: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        micro_conds: torch.Tensor,
        timestep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `(batch, codebook_size, height, width)` for token ids `(batch, height, width)`."""
        return super().forward(token_ids, encoder_hidden_states, pooled_projections, micro_conds)


def amused_defaults(transformer: AmusedTransformer, vq_scale: int) -> dict[str, Any]:
    """diffusers' ``AmusedPipeline`` settings: 12 steps, CFG 10, no negative prompt, the trained resolution."""
    side = transformer.config.sample_size * vq_scale
    return dict(steps=12, guidance=10.0, negative_prompt="", width=side, height=side)


def load_amused_conditioner(model_dir: Path, dtype: torch.dtype, device: torch.device, variant: str | None,
                            text_max_length: int | None = None, micro_score: float = 6.0) -> TextConditioner:
    """CLIP text conditioning padded to the tokenizer's ``model_max_length`` (at most 77), as ``AmusedPipeline``."""
    return load_text_conditioner(model_dir, dtype, device, variant, text_max_length, micro_score)


def tiny_amused_transformer(codebook: int = CODEBOOK) -> UVit2DModel:
    """A random ``UVit2DModel`` small enough for CPU tests (saved as ``_class_name: UVit2DModel``, as the hub's)."""
    return UVit2DModel(hidden_size=32, use_bias=False, hidden_dropout=0.0, cond_embed_dim=TEXT_WIDTH,
                       micro_cond_encode_dim=2, micro_cond_embed_dim=10, encoder_hidden_size=TEXT_WIDTH,
                       vocab_size=codebook + 1, codebook_size=codebook, in_channels=16, block_out_channels=16,
                       num_res_blocks=1, downsample=True, upsample=True, block_num_heads=1, num_hidden_layers=1,
                       num_attention_heads=2, attention_dropout=0.0, intermediate_size=32, layer_norm_eps=1e-6,
                       ln_elementwise_affine=True, sample_size=16)


AMUSED = ModelFamily(
    name="amused",
    transformer=AmusedTransformer,
    class_names=("UVit2DModel",),
    defaults=amused_defaults,
    load_conditioner=load_amused_conditioner,
    subfolders=TEXT_SUBFOLDERS,
    tiny_transformer=tiny_amused_transformer,
    model_index={"_class_name": "AmusedPipeline", "scheduler": ["scheduler", "AmusedScheduler"],
                 "transformer": ["diffusers", "UVit2DModel"]},
    cached_forward=amused_cached_forward,
)
