"""MaskGIT's VQGAN (taming-transformers ``VQModel``) as a diffusers ``VQModel``.

The reference is valeoai/Maskgit-pytorch (MIT) at commit 674ef1d934963b7550ad9068015e705a525ceecb (tag v1.0):
``Network/Taming/models/vqgan.py``, ``modules/diffusionmodules/model.py`` (Encoder/Decoder) and
``modules/vqvae/quantize.py`` (``VectorQuantizer2``), a copy of CompVis/taming-transformers. Its released
ImageNet VQGAN has ``embed_dim 256, n_embed 1024`` and ``ddconfig {z_channels 256, ch 128, ch_mult [1,1,2,2,4],
num_res_blocks 2, attn_resolutions [16], double_z false}``: f=16, images in [-1, 1].

diffusers' ``VQModel`` holds the same network: ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` are taming's levels
(``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D`` at the attention resolutions, attention after each
ResNet block), GroupNorm(32, eps 1e-6), SiLU, nearest 2x up-sampling then a 3x3 conv, and the same asymmetric
(0, 1, 0, 1) padding before the stride-2 down-sampling conv. So the engine keeps one VQ class for every family
and only the keys are renamed (:func:`diffusers_state_dict`). Two numerical differences remain, both float
rounding (decoded pixels agree within 1e-5; 4e-6 on the test fixture): diffusers computes attention with linear layers and scaled-dot-product
attention where taming uses 1x1 convolutions and ``bmm``/``softmax``; and diffusers' quantizer measures distances
with ``torch.cdist``, so :func:`image_tokens` computes taming's ``|z|^2 + |e|^2 - 2 z.e`` itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import VQModel


def vqmodel_config(ddconfig: Mapping, n_embed: int, embed_dim: int) -> dict:
    """diffusers ``VQModel`` arguments for a taming ``VQModel(ddconfig, n_embed, embed_dim)``.

    Args:
        ddconfig: taming's ``ddconfig`` (``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``,
            ``resolution``, ``in_channels``, ``out_ch``, ``z_channels``, ``double_z`` false).
        n_embed: codebook size. embed_dim: code width.
    """
    if ddconfig.get("double_z", True):
        raise ValueError("a taming VQGAN has double_z: false (the KL autoencoders set it true); got "
                         f"double_z={ddconfig.get('double_z', True)!r}")
    levels = len(ddconfig["ch_mult"])
    resolutions = [ddconfig["resolution"] // 2**level for level in range(levels)]
    attention = [res in ddconfig["attn_resolutions"] for res in resolutions]
    return {
        "in_channels": ddconfig["in_channels"],
        "out_channels": ddconfig["out_ch"],
        "down_block_types": tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attention),
        "up_block_types": tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attention)),
        "block_out_channels": tuple(ddconfig["ch"] * mult for mult in ddconfig["ch_mult"]),
        "layers_per_block": ddconfig["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": ddconfig["z_channels"],
        "sample_size": ddconfig["resolution"],
        "num_vq_embeddings": n_embed,
        "norm_num_groups": 32,
        "vq_embed_dim": embed_dim,
        "lookup_from_codebook": True,
        "force_upcast": True,
    }


_LEVEL_PARTS = {"block": "resnets", "attn": "attentions", "downsample": "downsamplers.0", "upsample": "upsamplers.0"}
_MID_PARTS = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}
_ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _rename(key: str, levels: int) -> str:
    """One taming key -> its diffusers name (``levels`` = len(ch_mult))."""
    net, where, *rest = key.split(".")
    if net in ("encoder", "decoder"):
        if where in ("down", "up"):  # diffusers counts decoder levels from the bottom, taming from the top
            level = int(rest[0]) if where == "down" else levels - 1 - int(rest[0])
            where, rest = f"{where}_blocks", [str(level), _LEVEL_PARTS[rest[1]], *rest[2:]]
        elif where == "mid":
            where, rest = "mid_block", [_MID_PARTS[rest[0]], *rest[1:]]
        elif where == "norm_out":
            where = "conv_norm_out"
    parts = ".".join([net, where, *rest]).split(".")
    if "attentions" in parts:
        parts[-2] = _ATTENTION_PARTS[parts[-2]]
    return ".".join("conv_shortcut" if part == "nin_shortcut" else part for part in parts)


def diffusers_state_dict(state: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A taming VQGAN state dict in diffusers ``VQModel`` names.

    Lightning's ``loss.*`` entries (the discriminator and LPIPS of training) are dropped; the attention's 1x1
    convolution weights ``(c, c, 1, 1)`` become linear weights ``(c, c)``.
    """
    out = {}
    for key, value in state.items():
        if key.startswith("loss."):
            continue
        new_key = _rename(key, levels)
        if ".attentions." in new_key and new_key.endswith("weight") and value.dim() == 4:
            value = value[:, :, 0, 0]
        out[new_key] = value
    return out


def load_taming_vqgan(ddconfig: Mapping, n_embed: int, embed_dim: int,
                      state: Mapping[str, torch.Tensor]) -> VQModel:
    """A diffusers ``VQModel`` holding a taming VQGAN's weights (``last.ckpt``'s ``["state_dict"]``), strictly."""
    model = VQModel(**vqmodel_config(ddconfig, n_embed, embed_dim))
    model.load_state_dict(diffusers_state_dict(state, len(ddconfig["ch_mult"])), strict=True)
    return model.eval()


@torch.no_grad()
def image_tokens(vq: VQModel, images: torch.Tensor) -> torch.Tensor:
    """`(B, h, w)` code ids of images `(B, 3, H, W)` in [-1, 1], as taming's ``VQModel.encode`` picks them.

    Taming's squared distance ``|z|^2 + |e|^2 - 2 z.e`` (``VectorQuantizer2.forward``), so near-ties resolve as
    in the reference, which diffusers' ``cdist`` does not guarantee.
    """
    latents = vq.quant_conv(vq.encoder(images.to(vq.dtype)))
    batch, channels, rows, cols = latents.shape
    z = latents.permute(0, 2, 3, 1).reshape(-1, channels)
    codebook = vq.quantize.embedding.weight
    distance = (torch.sum(z**2, dim=1, keepdim=True) + torch.sum(codebook**2, dim=1)
                - 2 * torch.einsum("bd,dn->bn", z, codebook.T))
    return torch.argmin(distance, dim=1).view(batch, rows, cols)


@torch.no_grad()
def decode_tokens(vq: VQModel, tokens: torch.Tensor) -> torch.Tensor:
    """Images `(B, 3, H, W)` in [-1, 1] for code ids `(B, h, w)` (taming's ``decode_code``, clamped as the
    reference's samplers clamp their output)."""
    batch, rows, cols = tokens.shape
    shape = (batch, rows, cols, vq.config.vq_embed_dim)
    return vq.decode(tokens, force_not_quantize=True, shape=shape).sample.clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """`(B, H, W, 3)` uint8 of images `(B, 3, H, W)` in [-1, 1]: ``((x + 1) / 2) * 255``, clipped, truncated,
    as the reference's ``extract_vq_features.py`` (main) writes images."""
    return (((images + 1) / 2) * 255).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
