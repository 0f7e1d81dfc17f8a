"""Training the image tokenizer: a diffusers ``VQModel`` on 64x64 scenes, 4x down-sampling, 256 codes.

Loss: mean squared error of the reconstruction plus diffusers' VQ loss (codebook + 0.25 x commitment,
with the straight-through estimator). The model is fully convolutional, so it trains on random 32x32
crops of the scenes: four times the steps for the same compute, which is what a small conv net on a
CPU is short of. Codes that no scene used during the last interval are restarted
on random encoder outputs of the current batch, so the codebook does not collapse onto a few entries.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import VQModel

from mgt.training.data import scene_tensors, training_seeds

CODEBOOK = 256
LATENT_CHANNELS = 8
RESTART_EVERY = 50  # steps between dead-code restarts
CROP = 32  # training crop side in pixels


def build_vqvae(codebook: int = CODEBOOK, channels: Sequence[int] = (16, 32, 32)) -> VQModel:
    """A VQ model with scale factor ``2**(len(channels)-1)`` and the Meissonic/aMUSEd decoding path."""
    return VQModel(act_fn="silu", block_out_channels=list(channels), down_block_types=["DownEncoderBlock2D"] * len(channels),
                   up_block_types=["UpDecoderBlock2D"] * len(channels), in_channels=3, out_channels=3,
                   latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=8,
                   num_vq_embeddings=codebook, sample_size=64, mid_block_add_attention=False,
                   lookup_from_codebook=True, force_upcast=True)


def train_vq(seed: int, steps: int, batch_size: int = 24, lr: float = 4e-3,
             on_step: Callable[[int, float], None] | None = None) -> VQModel:
    """Train a fresh VQ model for ``steps`` steps on new scenes each step; the result is in eval mode.

    Args:
        seed: seeds the initial weights and the scene stream, so a run is reproducible.
        on_step: called with (step, loss) after each step (progress bars).
    """
    torch.manual_seed(seed)
    vq = build_vqvae().train()
    optimizer = torch.optim.AdamW(vq.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * (
        0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))) + 0.02)
    generator = torch.Generator().manual_seed(seed)
    used = torch.zeros(vq.config.num_vq_embeddings, dtype=torch.bool)
    for step in range(steps):
        images = random_crops(scene_tensors(training_seeds(seed, step, batch_size, part=0))[0], generator)
        latents = vq.encode(images).latents
        quantized, vq_loss, (_, _, indices) = vq.quantize(latents)
        reconstruction = vq.decoder(vq.post_quant_conv(quantized))
        loss = F.mse_loss(reconstruction, images) + vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        used[indices.flatten()] = True
        if (step + 1) % RESTART_EVERY == 0 and step + 1 < steps * 0.8:
            _restart_dead_codes(vq, latents.detach(), used, generator)
            used.zero_()
        if on_step is not None:
            on_step(step, loss.item())
    return vq.eval().requires_grad_(False)


def random_crops(images: torch.Tensor, generator: torch.Generator, side: int = CROP) -> torch.Tensor:
    """One random ``side x side`` crop per image, at a multiple of 4 pixels (the token grid)."""
    cells = (images.shape[-1] - side) // 4 + 1
    corners = torch.randint(cells, (images.shape[0], 2), generator=generator) * 4
    return torch.stack([im[:, y:y + side, x:x + side] for im, (y, x) in zip(images, corners.tolist())])


@torch.no_grad()
def _restart_dead_codes(vq: VQModel, latents: torch.Tensor, used: torch.Tensor, generator: torch.Generator) -> None:
    dead = (~used).nonzero().flatten()
    if len(dead) == 0:
        return
    vectors = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    picks = torch.randint(len(vectors), (len(dead),), generator=generator)
    vq.quantize.embedding.weight[dead] = vectors[picks]


@torch.no_grad()
def encode_tokens(vq: VQModel, images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` images in [0, 1] -> ``(B, H/4, W/4)`` int64 code indices."""
    latents = vq.encode(images).latents
    _, _, (_, _, indices) = vq.quantize(latents)
    return indices.reshape(latents.shape[0], latents.shape[2], latents.shape[3])


@torch.no_grad()
def reconstruction_psnr(vq: VQModel, seeds: Sequence[int], batch_size: int = 64) -> float:
    """Mean PSNR (dB, images in [0, 1]) of encode -> quantize -> decode on the scenes of ``seeds``.

    Decoding goes through the same path as the pipeline (code indices looked up in the codebook, output
    clipped to [0, 1]), so this is the fidelity generated images can reach.
    """
    values = []
    for start in range(0, len(seeds), batch_size):
        images, _ = scene_tensors(seeds[start:start + batch_size])
        tokens = encode_tokens(vq, images)
        batch, h, w = tokens.shape
        decoded = vq.decode(tokens.flatten(), force_not_quantize=True,
                            shape=(batch, h, w, vq.config.latent_channels)).sample.clip(0, 1)
        mse = ((decoded - images) ** 2).flatten(1).mean(1).clamp_min(1e-10)
        values.append(-10 * torch.log10(mse))
    return float(torch.cat(values).mean())
