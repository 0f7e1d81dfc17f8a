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

from collections.abc import Mapping

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


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
    def no_class_id(self) -> int:
        """The embedding id that replaces the class token when the label is dropped (guidance's unconditional)."""
        return self.config.codebook_size + 1 + self.config.num_classes

    def forward(self, token_ids: torch.Tensor, class_labels: torch.Tensor,
                drop_label: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `(batch, codebook_size + 1, height, width)` for token ids `(batch, height, width)`.

        Args:
            token_ids (`torch.LongTensor` of shape `(batch, side, side)`): codes, the mask token where unknown.
            class_labels (`torch.LongTensor` of shape `(batch,)`): ImageNet class ids in ``[0, num_classes)``.
            drop_label (`torch.BoolTensor` of shape `(batch,)`, *optional*): True where the label is replaced by
                the "no class" token (the unconditional half of classifier-free guidance). None drops none.

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
