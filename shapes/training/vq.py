"""Training the image tokenizer: a diffusers ``VQModel`` on 64x64 scenes, 2x down-sampling, a fixed grid codebook.

The scenes are a few flat colours with sharp edges, so a token must name its 2x2 patch's colours exactly
(the scorer reads colour) and a flat patch of one colour should always get the same code (else the
transformer must guess among near-identical codes, which it cannot learn from the caption). A learned
codebook on a CPU budget did neither (19.8 dB, red decoded as orange, backgrounds spread over many codes):
most encoder outputs are background, so k-means spends the codes there and objects share a few.

So the codebook is fixed, as in finite scalar quantization (Mentzer et al. 2023): the integer grid
``{-2..2}^4`` (625 codes), written into the ``VQModel``'s embedding table. diffusers' nearest-neighbour
lookup on a product grid is per-channel rounding with clamping, so the checkpoint decodes and encodes
exactly as trained, with the stock ``VQModel``. Every code is reachable, none can die, and the encoder
learns to put each colour pair on its own grid point from the first step (its last layer starts with
gain ``INIT_SPREAD``, so that its outputs span the grid rather than all rounding to one point).

The loss is the mean absolute reconstruction error (sharper and faster to converge than the squared
error on flat colours), with object pixels (those that differ from the scene's background colour)
weighted ``OBJECT_WEIGHT`` times: objects cover a few percent of the pixels and carry all the meaning.
It reaches the encoder through the straight-through estimator of diffusers' quantizer. FSQ bounds its
latents (tanh); the stock ``VQModel`` cannot, so a penalty ``BOUND_WEIGHT * relu(|z| - BOUND)^2`` keeps
them on the grid. Without it 99.8 % of the latents drifted far outside (up to 2.7e4), each channel became
a sign bit (48 codes used) and the decoder drew blobs (the ``shapes`` scorer gave its reconstructions of
held-out scenes 0.11 against 0.89 for the scenes). A weak commitment term ``COMMIT_WEIGHT * (z - code)^2``
pulls each latent to its grid point: without it the encoder's GroupNorm (statistics of the whole image)
left flat backgrounds on rounding boundaries, so one white background far from any object got code 489 in
56 % and 464 in 44 % of its tokens, depending on the objects: noise no generator can predict (it then drew
no shapes at all). At 0.1 every such token gets one code, at 33.3 dB against 34.6 without the term (3000
steps; 163 codes used); 0.5 lost detail (26.9 dB, 105 codes at 1500 steps); a strong pull collapsed the
encoder onto a few points.

Down-sampling is 2x (32x32 tokens): at 4x with the bound, a 4x4 patch holding a corner, an edge and two
colours did not fit one of 625 codes within the CPU budget (21.9 dB, scorer 0.02 after 1000 steps,
against 27.8 dB and 0.53 at 2x). The model is fully convolutional, so it trains on random 32x32 crops of
the scenes: four times the steps for the same compute, which is what a small conv net on a CPU is short of.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from diffusers import VQModel

from shapes import scenes
from shapes.training.data import scene_tensors, training_seeds
from shapes.training.schedule import optimizer_step, warmup_cosine

LEVELS = (-2.0, -1.0, 0.0, 1.0, 2.0)  # grid values per latent channel
LATENT_CHANNELS = 4
OBJECT_WEIGHT = 8.0  # weight of object pixels in the reconstruction loss, against 1 for background pixels
INIT_SPREAD = 10.0  # initial gain of the encoder's last 1x1 convolution
BOUND = 2.5  # latents beyond +-BOUND (outside the grid's rounding cells) are penalized
BOUND_WEIGHT = 1.0  # weight of the squared excess in the loss
COMMIT_WEIGHT = 0.1  # weight of the squared distance of each latent to its grid point
CROP = 32  # training crop side in pixels


def grid_codebook(levels: Sequence[float] = LEVELS, channels: int = LATENT_CHANNELS) -> torch.Tensor:
    """``(len(levels)**channels, channels)``: every combination of the levels, first channel slowest."""
    return torch.tensor(list(itertools.product(levels, repeat=channels)))


def build_vqvae(channels: Sequence[int] = (32, 64)) -> VQModel:
    """A VQ model with scale factor ``2**(len(channels)-1)``, the Meissonic/aMUSEd decoding path and the grid codebook."""
    codebook = grid_codebook()
    vq = VQModel(act_fn="silu", block_out_channels=list(channels), down_block_types=["DownEncoderBlock2D"] * len(channels),
                 up_block_types=["UpDecoderBlock2D"] * len(channels), in_channels=3, out_channels=3,
                 latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=8,
                 num_vq_embeddings=len(codebook), sample_size=64, mid_block_add_attention=False,
                 lookup_from_codebook=True, force_upcast=True)
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(codebook)
        vq.quant_conv.weight.mul_(INIT_SPREAD)  # fresh encoders output ~0.1: spread them over the grid from the start
    vq.quantize.embedding.weight.requires_grad_(False)
    return vq


def train_vq(seed: int, steps: int, batch_size: int = 16, lr: float = 1e-3,
             on_step: Callable[[int, float], None] | None = None) -> VQModel:
    """Train a fresh VQ model for ``steps`` steps on new scenes each step; the result is in eval mode.

    Args:
        seed: seeds the initial weights and the scene stream, so a run is reproducible.
        on_step: called with (step, loss) after each step (progress bars).
    """
    torch.manual_seed(seed)
    vq = build_vqvae().train()
    optimizer = torch.optim.AdamW([p for p in vq.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps, warmup=max(1, min(50, steps // 10)), floor=0.02)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        images, batch = scene_tensors(training_seeds(seed, step, batch_size, part=0))
        images = random_crops(images, generator)
        latents = vq.encode(images).latents
        quantized, _, _ = vq.quantize(latents)  # straight-through: the grid point's value, gradient to latents
        reconstruction = vq.decoder(vq.post_quant_conv(quantized))
        loss = (_weighted_l1(reconstruction, images, batch) + BOUND_WEIGHT * out_of_grid_penalty(latents)
                + COMMIT_WEIGHT * (latents - quantized.detach()).pow(2).mean())
        value = optimizer_step(optimizer, schedule, loss)
        if on_step is not None:
            on_step(step, value)
    return vq.eval().requires_grad_(False)


def out_of_grid_penalty(latents: torch.Tensor) -> torch.Tensor:
    """Mean squared excess of the latents beyond ``+-BOUND``: zero on the grid, so rounding stays informative."""
    return torch.relu(latents.abs() - BOUND).pow(2).mean()


def random_crops(images: torch.Tensor, generator: torch.Generator, side: int = CROP) -> torch.Tensor:
    """One random ``side x side`` crop per image, at a multiple of 4 pixels (aligned with the token grid)."""
    cells = (images.shape[-1] - side) // 4 + 1
    corners = torch.randint(cells, (images.shape[0], 2), generator=generator) * 4
    return torch.stack([im[:, y:y + side, x:x + side] for im, (y, x) in zip(images, corners.tolist())])


def _weighted_l1(reconstruction: torch.Tensor, images: torch.Tensor, batch: Sequence[scenes.Scene]) -> torch.Tensor:
    background = torch.tensor([scenes.BACKGROUNDS[s.background] for s in batch], dtype=images.dtype) / 255
    is_object = ((images - background[:, :, None, None]).abs().amax(1, keepdim=True) > 0.02).to(images.dtype)
    weights = 1 + (OBJECT_WEIGHT - 1) * is_object
    return (weights * (reconstruction - images).abs()).mean() / weights.mean()


@torch.no_grad()
def encode_tokens(vq: VQModel, images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` images in [0, 1] -> ``(B, H/f, W/f)`` int64 code indices (``f`` the down-sampling factor)."""
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
        mse = ((reconstruct(vq, images) - images) ** 2).flatten(1).mean(1).clamp_min(1e-10)
        values.append(-10 * torch.log10(mse))
    return float(torch.cat(values).mean())


@torch.no_grad()
def reconstruct(vq: VQModel, images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` images in [0, 1] -> code indices -> decoded images in [0, 1], as the pipeline decodes."""
    tokens = encode_tokens(vq, images)
    batch, h, w = tokens.shape
    return vq.decode(tokens.flatten(), force_not_quantize=True,
                     shape=(batch, h, w, vq.config.latent_channels)).sample.clip(0, 1)
