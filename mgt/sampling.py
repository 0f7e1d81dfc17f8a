"""The sampling loop of masked generative transformers (arXiv 2411.10781 §2.1; diffusers' AmusedScheduler).

Every sample owns a ``torch.Generator``: the multinomial draw and the Gumbel noise of sample ``b`` come
from ``generators[b]`` alone, so a sample's tokens depend on (prompt, seed, config) and never on the
other samples of its batch. With one sample and the same generator the tokens equal
``AmusedScheduler.step``'s bit for bit. Confidence math runs in float32 whatever the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from mgt import schedules
from mgt.sampler_config import SamplerConfig

# predict(tokens (B, h, w), step_value) -> logits (B, codebook, h, w), already classifier-free guided.
Predictor = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class SamplingResult:
    tokens: torch.Tensor  # (B, h, w) int64, no mask token left
    nfe: int  # transformer calls per generation (each one a CFG-batched forward)


def apply_guidance(logits: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance on a ``[uncond; cond]`` logits batch: ``u + s * (c - u)`` in float32."""
    uncond, cond = logits.float().chunk(2)
    return cond.sub(uncond).mul_(guidance).add_(uncond)


def to_token_major(logits: torch.Tensor) -> torch.Tensor:
    """`(B, C, h, w)` logits -> contiguous float32 `(B, h*w, C)`, the layout the softmax and draws use."""
    batch, codes = logits.shape[:2]
    return logits.float().reshape(batch, codes, -1).transpose(1, 2).contiguous()


def gumbel_noise(length: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise drawn exactly as diffusers' ``gumbel_noise`` does (uniform_, clamps)."""
    uniform = torch.zeros(length, device=generator.device).uniform_(0, 1, generator=generator).to(device)
    return -torch.log((-torch.log(uniform.clamp(1e-20))).clamp(1e-20))


def draw_tokens(probs: torch.Tensor, tokens: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One multinomial draw per position from each sample's own generator; known tokens are kept.

    Args:
        probs: `(B, L, C)` float32 distributions.
        tokens: `(B, L)` current tokens (mask id where unknown).
    """
    drawn = torch.stack([
        torch.multinomial(probs[b].to(generators[b].device), 1, generator=generators[b])[:, 0]
        for b in range(len(generators))
    ]).to(tokens.device)
    return drawn


def remask_lowest_confidence(
    drawn: torch.Tensor,
    token_probs: torch.Tensor,
    unknown: torch.Tensor,
    num_to_mask: Sequence[int],
    temperature: torch.Tensor,
    generators: Sequence[torch.Generator],
    mask_token_id: int,
) -> torch.Tensor:
    """Re-mask the ``num_to_mask[b]`` drawn tokens of lowest annealed-Gumbel confidence.

    Confidence is ``log p(drawn) + temperature * Gumbel``; tokens that were already known get
    ``log(finfo.max)`` so they are never re-masked, as in the reference.

    Args:
        drawn: `(B, L)` tokens after the draw.
        token_probs: `(B, L)` float32 probability of each drawn token.
        unknown: `(B, L)` bool, positions that were masked before the draw.
    """
    token_probs = torch.where(unknown, token_probs, torch.finfo(token_probs.dtype).max)
    log_probs = torch.log(token_probs.clamp(1e-20))
    out = drawn.clone()
    for b, generator in enumerate(generators):
        confidence = log_probs[b] + temperature * gumbel_noise(drawn.shape[1], generator, drawn.device)
        cutoff = torch.kthvalue(confidence, num_to_mask[b] + 1).values  # == sort(confidence)[num_to_mask]
        out[b][confidence < cutoff] = mask_token_id
    return out


def vanilla_step(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    step_index: int,
    num_steps: int,
    generators: Sequence[torch.Generator],
    mask_token_id: int,
    sampler: SamplerConfig = SamplerConfig(),
) -> torch.Tensor:
    """One step of the reference sampler.

    Args:
        logits: `(B, L, C)` float32 guided logits (token-major, see :func:`to_token_major`).
        tokens: `(B, L)` int64 current tokens.
        step_index: ``i`` in ``0..num_steps-1``.

    Returns:
        `(B, L)` tokens for the next step; at the last step no mask is left.
    """
    unknown = tokens == mask_token_id
    probs = torch.softmax(logits, dim=-1)
    drawn = torch.where(unknown, draw_tokens(probs, tokens, generators), tokens)
    if step_index == num_steps - 1:
        return drawn
    schedule = schedules.get_schedule(sampler.mask_schedule, sampler.mask_schedule_power)
    counts = unknown.sum(-1).tolist()
    num_to_mask = [schedules.num_to_mask(schedule, step_index, num_steps, tokens.shape[1], n) for n in counts]
    token_probs = probs.gather(-1, drawn[..., None])[..., 0]
    temperature = gumbel_temperatures(sampler, num_steps)[step_index]
    return remask_lowest_confidence(drawn, token_probs, unknown, num_to_mask, temperature, generators, mask_token_id)


def gumbel_temperatures(sampler: SamplerConfig, num_steps: int) -> torch.Tensor:
    """Per-step Gumbel temperatures, ``linspace(start, end, T)`` in float32 as ``set_timesteps`` builds them."""
    start, end = sampler.gumbel_temperature
    return torch.linspace(start, end, num_steps)


def sample(
    predict: Predictor,
    shape: tuple[int, int, int],
    num_steps: int,
    generators: Sequence[torch.Generator],
    mask_token_id: int,
    sampler: SamplerConfig = SamplerConfig(),
    device: torch.device | str = "cpu",
    on_step: Callable[[int], None] | None = None,
) -> SamplingResult:
    """Run the sampler from a fully masked `(B, h, w)` grid to final tokens.

    ``predict(tokens, t)`` gets the step value ``t = T-1-i`` that the reference pipeline passes.
    """
    batch, height, width = shape
    if len(generators) != batch:
        raise ValueError(f"need one generator per sample: got {len(generators)} for a batch of {batch}")
    tokens = torch.full(shape, mask_token_id, dtype=torch.long, device=device)
    for i in range(num_steps):
        logits = to_token_major(predict(tokens, num_steps - 1 - i))
        flat = vanilla_step(logits, tokens.reshape(batch, -1), i, num_steps, generators, mask_token_id, sampler)
        tokens = flat.reshape(batch, height, width)
        if on_step is not None:
            on_step(i)
    return SamplingResult(tokens=tokens, nfe=num_steps)
