"""The Meissonic family (Meissonic-1024, Monetico-512): its transformer, rebuilt from diffusers 0.42.1 parts,
and its row of the family table.

Meissonic (github.com/viiika/Meissonic, hub ``MeissonFlow/Meissonic``) is not in diffusers. Its
``src/transformer.py`` at commit aeba85e is a Flux-style MM-DiT over VQ tokens; every block it uses
exists in diffusers 0.42.1 with the same parameter names, so this module only wires them together.
The parameter names equal the hub checkpoint's (``transformer/diffusion_pytorch_model.safetensors``),
so a strict ``load_state_dict`` is the parity check.

Reference quirk kept: the transformer receives the integer step value and multiplies it by 1000.
Reference quirk fixed: the RoPE image ids are the token grid *after* the down block, built here from
the input shape, so every resolution works (the reference pipeline only works at 1024 px).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import (
    CombinedTimestepTextProjEmbeddings,
    TimestepEmbedding,
    get_timestep_embedding,
)
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import RMSNorm
from diffusers.models.resnet import Downsample2D, Upsample2D
from diffusers.models.transformers.transformer_flux import (
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from diffusers.models.unets.uvit_2d import ConvMlmLayer, UVit2DConvEmbed
from torch import nn

from mgt.efficient.recap_meissonic import meissonic_cached_forward
from mgt.models.families import ModelFamily
from mgt.models.text import TEXT_SUBFOLDERS, TextConditioner, load_text_conditioner
from mgt.models.tiny import CODEBOOK, TEXT_WIDTH
from mgt.models.token_grid import TokenGridMixin

MICRO_COND_ENCODE_DIM = 256  # hard-coded in the reference forward()
NUM_MICRO_CONDS = 5  # [width, height, crop_top, crop_left, score]
# The negative prompt of every official Meissonic script (inference.py, app.py) and the paper's evaluation.
MEISSONIC_NEGATIVE_PROMPT = (
    "worst quality, low quality, low res, blurry, distortion, watermark, logo, signature, text, jpeg artifacts, "
    "signature, sketch, duplicate, ugly, identifying mark"
)


class _DownBlock(nn.Module):
    """Holds the optional 2x down-sampling conv so the keys read ``down_block.downsample.*``."""

    def __init__(self, channels: int, enabled: bool):
        super().__init__()
        self.downsample = (
            Downsample2D(channels, use_conv=True, padding=0, name="Conv2d_0", kernel_size=2,
                         norm_type="rms_norm", eps=1e-6, elementwise_affine=True, bias=False)
            if enabled else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)


class _UpBlock(nn.Module):
    """Holds the optional 2x transpose-conv up-sampling so the keys read ``up_block.upsample.*``."""

    def __init__(self, channels: int, enabled: bool):
        super().__init__()
        self.upsample = (
            Upsample2D(channels, use_conv_transpose=True, kernel_size=2, padding=0, name="conv",
                       norm_type="rms_norm", eps=1e-6, elementwise_affine=True, bias=False,
                       interpolate=False)
            if enabled else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.upsample is None else self.upsample(x)


def image_rope_ids(rows: int, cols: int, device=None) -> torch.Tensor:
    """RoPE position ids of a ``rows x cols`` token grid: (rows*cols, 3) = [0, row, col], row-major."""
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3)


class MeissonicTransformer(TokenGridMixin, ModelMixin, ConfigMixin):
    """Meissonic's text-to-token transformer (hub ``_class_name: "Transformer2DModel"``).

    Config keys are those of the hub ``transformer/config.json``; ``in_channels``, ``patch_size`` and
    ``guidance_embeds`` are accepted and unused, as in the reference.
    """

    config_name = "config.json"
    _no_split_modules = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        num_layers: int = 14,
        num_single_layers: int = 28,
        attention_head_dim: int = 128,
        num_attention_heads: int = 8,
        joint_attention_dim: int = 1024,
        pooled_projection_dim: int = 1024,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, ...] = (16, 56, 56),
        vocab_size: int = 8256,
        codebook_size: int = 8192,
        downsample: bool = True,
        upsample: bool = True,
    ):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        if pooled_projection_dim != inner_dim:
            raise ValueError(
                f"pooled_projection_dim ({pooled_projection_dim}) must equal num_attention_heads x "
                f"attention_head_dim ({num_attention_heads} x {attention_head_dim} = {inner_dim}): the "
                "time/text embedder is fed cond_embed's output, whose width is the inner dimension"
            )
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(f"axes_dims_rope {list(axes_dims_rope)} must sum to attention_head_dim ({attention_head_dim})")
        if vocab_size <= codebook_size:
            raise ValueError(f"vocab_size ({vocab_size}) must exceed codebook_size ({codebook_size}): the mask id is vocab_size-1")

        self.pos_embed = FluxPosEmbed(theta=10000, axes_dim=list(axes_dims_rope))
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            embedding_dim=inner_dim, pooled_projection_dim=pooled_projection_dim
        )
        self.context_embedder = nn.Linear(joint_attention_dim, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim=inner_dim, num_attention_heads=num_attention_heads,
                                 attention_head_dim=attention_head_dim)
            for _ in range(num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim=inner_dim, num_attention_heads=num_attention_heads,
                                       attention_head_dim=attention_head_dim)
            for _ in range(num_single_layers)
        )
        self.embed = UVit2DConvEmbed(inner_dim, inner_dim, vocab_size, True, 1e-6, False)
        self.mlm_layer = ConvMlmLayer(inner_dim, inner_dim, False, True, 1e-6, codebook_size)
        self.cond_embed = TimestepEmbedding(
            MICRO_COND_ENCODE_DIM * NUM_MICRO_CONDS + pooled_projection_dim, inner_dim, sample_proj_bias=False
        )
        self.encoder_proj_layer_norm = RMSNorm(inner_dim, 1e-6, True)
        self.project_to_hidden_norm = RMSNorm(inner_dim, 1e-6, True)
        self.project_to_hidden = nn.Linear(inner_dim, inner_dim, bias=False)
        self.project_from_hidden_norm = RMSNorm(inner_dim, 1e-6, True)
        self.project_from_hidden = nn.Linear(inner_dim, inner_dim, bias=False)
        self.down_block = _DownBlock(inner_dim, downsample)
        self.up_block = _UpBlock(inner_dim, upsample)

    def forward(
        self,
        token_ids: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        micro_conds: torch.Tensor,
        timestep: torch.Tensor,
    ) -> torch.Tensor:
        """Logits over the codebook.

        Args:
            token_ids: `(batch, height, width)` int64 VQ token ids; ``vocab_size-1`` is the mask.
            encoder_hidden_states: `(batch, 77, joint_attention_dim)` penultimate CLIP hidden states.
            pooled_projections: `(batch, pooled_projection_dim)` CLIP ``text_embeds``.
            micro_conds: `(batch, 5)` = ``[width, height, crop_top, crop_left, score]``.
            timestep: `(1,)` or `(batch,)` integer step value (``T-1-i``); multiplied by 1000 inside.

        Returns:
            `(batch, codebook_size, height, width)` logits.
        """
        batch, height, width = token_ids.shape
        micro = get_timestep_embedding(
            micro_conds.flatten(), MICRO_COND_ENCODE_DIM, flip_sin_to_cos=True, downscale_freq_shift=0
        ).reshape(batch, -1)
        pooled = torch.cat([pooled_projections, micro], dim=1).to(self.dtype)
        pooled = self.cond_embed(pooled).to(encoder_hidden_states.dtype)

        hidden = self.embed(token_ids)
        encoder_hidden_states = self.encoder_proj_layer_norm(self.context_embedder(encoder_hidden_states))
        hidden = self.down_block(hidden)
        channels, rows, cols = hidden.shape[1:]
        hidden = hidden.permute(0, 2, 3, 1).reshape(batch, rows * cols, channels)
        hidden = self.project_to_hidden(self.project_to_hidden_norm(hidden))

        # Reference quirk kept: the step value is cast to the model dtype *then* scaled by 1000.
        timestep = timestep.to(hidden.dtype) * 1000
        temb = self.time_text_embed(timestep, pooled)

        text_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=hidden.device)
        ids = torch.cat([text_ids, image_rope_ids(rows, cols, device=hidden.device)], dim=0)
        rope = self.pos_embed(ids)

        for block in self.transformer_blocks:
            encoder_hidden_states, hidden = block(hidden, encoder_hidden_states, temb, rope)
        for block in self.single_transformer_blocks:
            encoder_hidden_states, hidden = block(hidden, encoder_hidden_states, temb, rope)

        hidden = self.project_from_hidden(self.project_from_hidden_norm(hidden))
        hidden = hidden.reshape(batch, rows, cols, channels).permute(0, 3, 1, 2)
        hidden = self.up_block(hidden)
        return self.mlm_layer(hidden)


def meissonic_defaults(transformer: MeissonicTransformer, vq_scale: int) -> dict[str, Any]:
    """The reference scripts' settings: 64 steps, CFG 9, their negative prompt, 1024 px (Monetico: 512 px)."""
    side = (64 if transformer.config.downsample else 32) * vq_scale  # Meissonic-1024 / Monetico-512
    return dict(steps=64, guidance=9.0, negative_prompt=MEISSONIC_NEGATIVE_PROMPT, width=side, height=side)


def load_meissonic_conditioner(model_dir: Path, dtype: torch.dtype, device: torch.device, variant: str | None,
                               text_max_length: int = 77, micro_score: float = 6.0) -> TextConditioner:
    """CLIP text conditioning; the reference pipeline pads prompts to 77 tokens whatever the tokenizer says."""
    return load_text_conditioner(model_dir, dtype, device, variant, text_max_length, micro_score)


def tiny_meissonic_transformer(downsample: bool = True, codebook: int = CODEBOOK, layers: int = 1,
                               single_layers: int = 1) -> MeissonicTransformer:
    """A random Meissonic (``downsample=True``, 1024-style) or Monetico (False, 512-style), small enough for CPU tests."""
    return MeissonicTransformer(num_layers=layers, num_single_layers=single_layers, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=32,
                                axes_dims_rope=(4, 6, 6), vocab_size=codebook + 1, codebook_size=codebook,
                                downsample=downsample, upsample=downsample)


MEISSONIC = ModelFamily(
    name="meissonic",
    transformer=MeissonicTransformer,
    class_names=("Transformer2DModel",),  # the hub's name for the reference class (not diffusers' class)
    defaults=meissonic_defaults,
    load_conditioner=load_meissonic_conditioner,
    subfolders=TEXT_SUBFOLDERS,
    tiny_transformer=tiny_meissonic_transformer,
    model_index={"_class_name": "Pipeline", "scheduler": ["scheduler", "Scheduler"],
                 "transformer": ["transformer", "Transformer2DModel"]},
    cached_forward=meissonic_cached_forward,
)
