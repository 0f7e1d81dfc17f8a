"""The MaskGIT transformer: a class-conditional bidirectional transformer over VQ tokens.

Reproduces ``MaskTransformer`` of valeoai/Maskgit-pytorch (MIT), ``Network/transformer.py`` at commit
674ef1d934963b7550ad9068015e705a525ceecb (tag v1.0, the code of the released ``llvictorll/Maskgit-pytorch``
weights). The parameter names equal the reference's, so a reference state dict loads with ``strict=True``,
and the forward runs the reference's operations in the same order (logits equal bit for bit on CPU).

Layout of the reference, kept: the class token comes *last* in the sequence (image tokens, then one class
token); the embedding table holds ``codebook_size`` codes, the mask token (id ``codebook_size``),
``num_classes`` class tokens and one "no class" token for classifier-free guidance; the output layer is the
transposed embedding plus a per-position bias, cut to the image positions and the codes plus the mask token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from mgt.efficient.recap_maskgit import maskgit_cached_forward
from mgt.models import vqgan
from mgt.models.class_labels import ClassConditioner, check_class_prompts
from mgt.models.families import ModelFamily


class _PreNorm(nn.Module):
    """``fn(LayerNorm(x))``; the attribute names give the reference keys ``.norm`` and ``.fn``."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class _SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch first, with biases) as self-attention; keys ``.mha.*``."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, num_heads=heads, dropout=dropout, batch_first=True, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # need_weights=True as in the reference: it picks the same attention kernel, so the same float results.
        return self.mha(x, x, x)[0]


class _FeedForward(nn.Module):
    """Linear-GELU-Dropout-Linear-Dropout; keys ``.net.0`` and ``.net.3``."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Encoder(nn.Module):
    """Pre-norm transformer layers; keys ``layers.{i}.0`` (attention) and ``layers.{i}.1`` (MLP)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([_PreNorm(dim, _SelfAttention(dim, heads, dropout)),
                           _PreNorm(dim, _FeedForward(dim, mlp_dim, dropout))])
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attention, feed_forward in self.layers:
            x = x + attention(x)
            x = x + feed_forward(x)
        return x


def _projection(hidden_dim: int, dropout: float, final_linear: bool) -> nn.Sequential:
    """The reference's first layer (``final_linear``) or last layer: LN(1e-12), Dropout, Linear, GELU, LN..."""
    layers = [nn.LayerNorm(hidden_dim, eps=1e-12), nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim),
              nn.GELU(), nn.LayerNorm(hidden_dim, eps=1e-12)]
    if final_linear:
        layers += [nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim)]
    return nn.Sequential(*layers)


class MaskGitTransformer(ModelMixin, ConfigMixin):
    """MaskGIT's bidirectional transformer (reference ``MaskTransformer``; defaults are MaskGIT-256's).

    Args:
        tokens_per_side (`int`, *optional*, defaults to 16): side of the square token grid (the reference's
            ``f_factor``): 16 for 256 px, 32 for 512 px.
        hidden_dim (`int`, *optional*, defaults to 768): width.
        codebook_size (`int`, *optional*, defaults to 1024): VQ codes; the mask token is id ``codebook_size``.
        depth (`int`, *optional*, defaults to 24): transformer layers.
        heads (`int`, *optional*, defaults to 16): attention heads (the reference's own default, 8, is not what
            its trainer builds).
        mlp_dim (`int`, *optional*, defaults to 3072): MLP hidden width.
        dropout (`float`, *optional*, defaults to 0.1): dropout in training.
        num_classes (`int`, *optional*, defaults to 1000): class labels (the reference's ``nclass``).
    """

    @register_to_config
    def __init__(self, tokens_per_side: int = 16, hidden_dim: int = 768, codebook_size: int = 1024, depth: int = 24,
                 heads: int = 16, mlp_dim: int = 3072, dropout: float = 0.1, num_classes: int = 1000):
        super().__init__()
        vocabulary = codebook_size + 1 + num_classes + 1  # codes, mask token, classes, "no class"
        positions = tokens_per_side * tokens_per_side + 1  # image tokens, then the class token
        self.tok_emb = nn.Embedding(vocabulary, hidden_dim)
        self.pos_emb = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, positions, hidden_dim), 0.0, 0.02))
        self.first_layer = _projection(hidden_dim, dropout, final_linear=True)
        self.transformer = _Encoder(hidden_dim, depth, heads, mlp_dim, dropout)
        self.last_layer = _projection(hidden_dim, dropout, final_linear=False)
        self.bias = nn.Parameter(torch.zeros(positions, vocabulary))

    @property
    def mask_token_id(self) -> int:
        """The id of the mask token: ``codebook_size`` (the first id after the codes)."""
        return self.config.codebook_size

    @property
    def token_grid_multiple(self) -> int:
        """Token-grid sides must be a multiple of this: 1 (the grid is fixed anyway, ``tokens_per_side``)."""
        return 1

    @property
    def no_class_id(self) -> int:
        """The embedding id that replaces the class token when the label is dropped (guidance's unconditional)."""
        return self.config.codebook_size + 1 + self.config.num_classes

    def forward(self, token_ids: torch.Tensor, class_labels: torch.Tensor,
                drop_label: torch.Tensor | None = None, timestep: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `(batch, codebook_size + 1, height, width)` for token ids `(batch, height, width)`.

        Args:
            token_ids (`torch.LongTensor` of shape `(batch, side, side)`): codes, the mask token where unknown.
            class_labels (`torch.LongTensor` of shape `(batch,)`): ImageNet class ids in ``[0, num_classes)``.
            drop_label (`torch.BoolTensor` of shape `(batch,)`, *optional*): True where the label is replaced by
                the "no class" token (the unconditional half of classifier-free guidance). None drops none.
            timestep: accepted and ignored (MaskGIT has no timestep input), so every MGT is called alike.

        Returns:
            `torch.Tensor` of shape `(batch, codebook_size + 1, side, side)`: one logit per code *and* for the
            mask token, as the reference returns them (its samplers' softmax runs over the mask token too).
        """
        batch, rows, cols = token_ids.shape
        side = self.config.tokens_per_side
        if (rows, cols) != (side, side):
            raise ValueError(f"token grid {rows}x{cols} does not fit this transformer, built for {side}x{side} "
                             f"tokens (tokens_per_side={side}); pass a {side}x{side} grid")
        cls_token = class_labels.view(batch, 1) + self.config.codebook_size + 1
        if drop_label is not None:
            cls_token = torch.where(drop_label.view(batch, 1), self.no_class_id, cls_token)
        sequence = torch.cat([token_ids.view(batch, -1), cls_token], -1)
        x = self.tok_emb(sequence) + self.pos_emb
        x = self.last_layer(self.transformer(self.first_layer(x)))
        # The full product, then the cut, as the reference computes it (same GEMM, same bits).
        logits = torch.matmul(x, self.tok_emb.weight.T) + self.bias
        logits = logits[:, :side * side, :self.config.codebook_size + 1]
        return logits.transpose(1, 2).reshape(batch, -1, side, side)


def reference_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The transformer weights in a reference checkpoint (``torch.load(path, weights_only=True)``).

    The reference trainer saves ``{"model_state_dict": ..., "optimizer_state_dict": ..., "iter": ...}``;
    a bare state dict is accepted too, and a ``module.`` prefix (a model saved while wrapped in
    DistributedDataParallel) is removed.
    """
    state = checkpoint.get("model_state_dict", checkpoint)
    if not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError("not a MaskGIT checkpoint: expected a state dict or {'model_state_dict': state dict}, "
                         f"got keys {sorted(checkpoint)[:5]}")
    return {key.removeprefix("module."): value for key, value in state.items()}


# The reference README's settings (valeoai/Maskgit-pytorch v1.0). Its CFG mixes (1 + w) c - w u, which is the
# engine's u + s (c - u) at s = 1 + w: "CFG 3" (256) is guidance 4, "CFG 2.8" (512) is guidance 3.8; its
# linear ramp w_i = w i/(T-1) is guidance_schedule "linear". Gumbel: r_temp, annealed linearly to 0.
REFERENCE_SETTINGS = {
    256: dict(steps=8, guidance=4.0, gumbel_temperature=(4.5, 0.0)),
    512: dict(steps=15, guidance=3.8, gumbel_temperature=(7.0, 0.0)),
}
# What every MaskGIT run samples with unless the sampler sets the field: the reference's confidence sampler.
REFERENCE_SAMPLER = {"mask_schedule": "arccos_maskgit", "guidance_schedule": "linear", "gumbel_noise": "numpy"}
# The released ImageNet VQGAN of llvictorll/Maskgit-pytorch (pretrained_maskgit/VQGAN/model.yaml).
VQGAN_DDCONFIG = {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                  "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0}
VQGAN_CODES, VQGAN_EMBED_DIM = 1024, 256
RELEASED_REPO = "llvictorll/Maskgit-pytorch"
RELEASED_FILES = {256: "pretrained_maskgit/MaskGIT/MaskGIT_ImageNet_256.pth",
                  512: "pretrained_maskgit/MaskGIT/MaskGIT_ImageNet_512.pth"}
RELEASED_VQGAN = "pretrained_maskgit/VQGAN/last.ckpt"


def maskgit_defaults(transformer: MaskGitTransformer, vq_scale: int) -> dict[str, Any]:
    """The reference README's settings for the grid: 16x16 tokens (256 px) or 32x32 and more (512 px)."""
    side = transformer.config.tokens_per_side
    settings = REFERENCE_SETTINGS[512 if side >= 32 else 256]
    sampler = dict(REFERENCE_SAMPLER, gumbel_temperature=settings["gumbel_temperature"])
    return dict(steps=settings["steps"], guidance=settings["guidance"], negative_prompt="", width=side * vq_scale,
                height=side * vq_scale, sampler=sampler)


def load_class_conditioner(model_dir: Path, dtype: torch.dtype, device: torch.device,
                           variant: str | None) -> ClassConditioner:
    """Class labels: the number of classes comes from the transformer's config."""
    config = json.loads((model_dir / "transformer" / "config.json").read_text())
    return ClassConditioner(config.get("num_classes", 1000))


def tiny_maskgit_transformer(tokens_per_side: int = 16, codebook: int = 64) -> MaskGitTransformer:
    """A random MaskGIT over a 16x16 grid (256-style) with all 1000 ImageNet classes, small enough for CPU tests."""
    return MaskGitTransformer(tokens_per_side=tokens_per_side, hidden_dim=32, codebook_size=codebook, depth=2,
                              heads=2, mlp_dim=64, dropout=0.0, num_classes=1000)


def write_released_model(folder: Path, checkpoint: Path, vqgan_checkpoint: Path, tokens_per_side: int,
                         transformer_config: Mapping[str, Any] | None = None,
                         vqgan_config: Mapping[str, Any] | None = None) -> None:
    """A hub-layout MaskGIT folder (``transformer/ vqvae/ model_index.json``) from the reference's released files.

    Args:
        checkpoint: ``MaskGIT_ImageNet_{256,512}.pth`` (read with ``torch.load(weights_only=True)``).
        vqgan_checkpoint: the Lightning ``last.ckpt`` of the taming VQGAN (its ``loss.*`` entries are dropped).
        tokens_per_side: 16 (256 px) or 32 (512 px).
        transformer_config: other :class:`MaskGitTransformer` arguments; None: the released model's.
        vqgan_config: ``{"ddconfig", "n_embed", "embed_dim"}`` of the VQGAN; None: the released VQGAN's.
    """
    from mgt.models.tiny import write_model

    state = reference_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    transformer = MaskGitTransformer(tokens_per_side=tokens_per_side, **{"dropout": 0.0, **(transformer_config or {})})
    transformer.load_state_dict(state, strict=True)
    vq = vqgan_config or {"ddconfig": VQGAN_DDCONFIG, "n_embed": VQGAN_CODES, "embed_dim": VQGAN_EMBED_DIM}
    vq_state = torch.load(vqgan_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    vqvae = vqgan.load_taming_vqgan(vq["ddconfig"], vq["n_embed"], vq["embed_dim"], vq_state)
    write_model(folder, transformer, vqvae, MASKGIT)


def build_released(folder: Path, resolution: int) -> None:
    """Download the released MaskGIT-``resolution`` and the VQGAN from the hub and write them into ``folder``."""
    from mgt.hub.checkpoints import fetch_hub

    files = [fetch_hub(RELEASED_REPO, None, filename=name, what=f"{RELEASED_REPO}/{name}")
             for name in (RELEASED_FILES[resolution], RELEASED_VQGAN)]
    write_released_model(folder, *files, tokens_per_side=resolution // 16)


def build_maskgit_256(folder: Path) -> None:
    build_released(folder, 256)


def build_maskgit_512(folder: Path) -> None:
    build_released(folder, 512)


MASKGIT = ModelFamily(
    name="maskgit",
    transformer=MaskGitTransformer,
    class_names=("MaskTransformer",),  # the reference's class (Network/transformer.py)
    defaults=maskgit_defaults,
    load_conditioner=load_class_conditioner,
    subfolders=(),
    tiny_transformer=tiny_maskgit_transformer,
    model_index={"_class_name": "MaskGIT", "transformer": ["transformer", "MaskTransformer"]},
    pixel_range=(-1.0, 1.0),
    image_tokens=vqgan.image_tokens,  # taming's distance: codes equal the reference's
    check_prompts=check_class_prompts,
    cached_forward=maskgit_cached_forward,
)
