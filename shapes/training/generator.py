"""Training the generator: our Meissonic transformer and a small CLIP text encoder, from scratch.

The text encoder is first pre-trained on captions alone (:mod:`shapes.training.caption_encoder`: why), then
trained jointly with the transformer.

The objective is Meissonic's (``train/train_meissonic.py``, docs/models.md §1): ``t ~ U(0, 1)``, mask
rate ``cos(pi/2 t)``, ``round(L * rate)`` tokens (at least one) masked at random positions, cross-entropy
on the masked tokens only, and condition dropout (the caption replaced by the empty prompt) so that
classifier-free guidance works at inference. Micro-conditions are ``[64, 64, 0, 0, 6]``, as the
pipeline passes them.

Timestep (our choice, in the terms of docs/models.md §1): the reference trains on ``mask_prob*1000``
but samples with the integer step value ``T-1-i``, so its model never sees at inference the values it
was trained on. We train on the value the sampler will pass for the same mask rate at ``T`` steps:
before step ``i`` the vanilla sampler has ``cos(pi/2 * i/T)`` of the tokens masked and passes
``T-1-i``, so a training sample with ``t`` gets ``max(T(1-t) - 1, 0)``, exact at every integer step.
``T`` is the model's default step count (``_maskray_defaults.steps``); the transformer multiplies by
1000 as at inference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import VQModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from mgt.meissonic import MeissonicTransformer
from shapes.training.caption_encoder import caption_ids, pretrain_text_encoder
from shapes.training.data import scene_tensors, training_seeds
from shapes.training.schedule import optimizer_step, warmup_cosine
from shapes.training.vq import encode_tokens

TEXT_WIDTH = 64
TEXT_LENGTH = 24  # tokens per caption, padded (the longest caption of the grammar is 20)
MICRO_CONDS = (64.0, 64.0, 0.0, 0.0, 6.0)


def build_text_encoder(tokenizer: CLIPTokenizer, projection_dim: int) -> CLIPTextModelWithProjection:
    """A 2-layer CLIP text encoder over the tokenizer's vocabulary (bos/eos are its last two ids)."""
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TEXT_LENGTH,
                            projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config)


def build_transformer(codebook: int, width: int = 128, heads: int = 4, layers: int = 1,
                      single_layers: int = 2) -> MeissonicTransformer:
    """A small Meissonic transformer that down-samples the token grid 2x, as Meissonic-1024 does."""
    head_dim = width // heads
    rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    return MeissonicTransformer(num_layers=layers, num_single_layers=single_layers, attention_head_dim=head_dim,
                                num_attention_heads=heads, joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=width,
                                axes_dims_rope=rope, vocab_size=codebook + 1, codebook_size=codebook,
                                downsample=True, upsample=True)


def mask_tokens(tokens: torch.Tensor, mask_id: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                                          torch.Tensor]:
    """Meissonic's masking: ``t ~ U(0,1)`` per sample, ``round(L cos(pi/2 t))`` >= 1 random positions masked.

    Args:
        tokens: `(B, h, w)` code indices.

    Returns:
        masked tokens `(B, h, w)`, the mask `(B, h, w)` bool, and ``t`` `(B,)`.
    """
    batch, length = tokens.shape[0], tokens[0].numel()
    t = torch.rand(batch, generator=generator)
    num_masked = (length * torch.cos(t * math.pi / 2)).round().clamp(min=1)
    order = torch.rand(batch, length, generator=generator).argsort(dim=-1).argsort(dim=-1)  # random ranks
    mask = (order < num_masked[:, None]).reshape(tokens.shape)
    return torch.where(mask, mask_id, tokens), mask, t


def sampler_timestep(t: torch.Tensor, steps: int) -> torch.Tensor:
    """The step value the vanilla sampler passes at mask rate ``cos(pi/2 t)`` with ``steps`` steps."""
    return (steps * (1 - t) - 1).clamp(min=0)


def encode_text(tokenizer: CLIPTokenizer, encoder: CLIPTextModelWithProjection,
                prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate hidden states `(B, TEXT_LENGTH, TEXT_WIDTH)` and ``text_embeds``, as ``mgt.text`` reads them."""
    out = encoder(caption_ids(tokenizer, prompts, TEXT_LENGTH), output_hidden_states=True, return_dict=True)
    return out.hidden_states[-2], out.text_embeds


class TrainedGenerator(NamedTuple):
    """What :func:`train_generator` returns: both models in eval mode and the figures of the run."""

    transformer: MeissonicTransformer
    text_encoder: CLIPTextModelWithProjection
    steps_done: int
    caption_accuracy: float | None  # held-out accuracy of the text pre-training heads; None if skipped


def train_generator(vq: VQModel, tokenizer: CLIPTokenizer, seed: int, steps: int, sampler_steps: int,
                    batch_size: int = 16, lr: float = 1e-3, cond_dropout: float = 0.1, text_steps: int = 1000,
                    should_stop: Callable[[], bool] = lambda: False,
                    on_step: Callable[[int, float], None] | None = None,
                    on_text_step: Callable[[int, float], None] | None = None,
                    ) -> TrainedGenerator:
    """Pre-train the text encoder on captions, then train it with the transformer for up to ``steps`` steps.

    Args:
        vq: the trained tokenizer; scenes are encoded with it on the fly.
        sampler_steps: ``T`` of the timestep rule (the model's default sampling steps).
        cond_dropout: share of captions replaced by ``""`` (the unconditional branch of CFG).
        text_steps: steps of caption-only pre-training of the text encoder
            (:func:`shapes.training.caption_encoder.pretrain_text_encoder`) before the joint steps; 0 skips it.
        should_stop: checked after each step (a wall-clock budget); the lr schedule follows ``steps``.
    """
    torch.manual_seed(seed)
    transformer = build_transformer(vq.config.num_vq_embeddings).train()
    text_encoder = build_text_encoder(tokenizer, transformer.config.pooled_projection_dim)
    caption_accuracy = None
    if text_steps:
        caption_accuracy = pretrain_text_encoder(tokenizer, text_encoder, seed, text_steps, TEXT_LENGTH,
                                                 on_step=on_text_step)
    text_encoder.train()
    parameters = [*transformer.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = max(1, min(100, steps // 10))
    schedule = warmup_cosine(optimizer, steps, warmup=warmup, floor=0.05)
    generator = torch.Generator().manual_seed(seed)
    mask_id = transformer.mask_token_id
    micro = torch.tensor([MICRO_CONDS] * batch_size)
    done = 0
    for step in range(steps):
        images, batch = scene_tensors(training_seeds(seed, step, batch_size, part=1))
        tokens = encode_tokens(vq, images)
        drop = torch.rand(batch_size, generator=generator) < cond_dropout
        captions = ["" if d else s.caption for d, s in zip(drop.tolist(), batch)]
        hidden, pooled = encode_text(tokenizer, text_encoder, captions)
        masked, mask, t = mask_tokens(tokens, mask_id, generator)
        logits = transformer(masked, hidden, pooled, micro, sampler_timestep(t, sampler_steps))
        loss = F.cross_entropy(logits.permute(0, 2, 3, 1)[mask], tokens[mask])
        value = optimizer_step(optimizer, schedule, loss, clip=parameters)
        done = step + 1
        if on_step is not None:
            on_step(step, value)
        if should_stop():
            break
    return TrainedGenerator(transformer.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False),
                            done, caption_accuracy)
