"""The sampling loop of masked generative transformers (arXiv 2411.10781 §2-§3; diffusers' AmusedScheduler).

Every sample owns a ``torch.Generator``: the noise, the multinomial draw, the Gumbel noise and the random
re-mask of sample ``b`` come from ``generators[b]`` alone, in that order, so a sample's tokens depend on
(prompt, seed, config) and never on the other samples of its batch. With one sample, the same generator and
the vanilla config the tokens equal ``AmusedScheduler.step``'s bit for bit (per step: multinomial over
(L, C), then Gumbel ``uniform_`` over L). Confidence math runs in float32 whatever the model dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mgt.sampling import schedules
from mgt.sampling.cached_context import CachedContext
from mgt.sampling.differential_sampling import DifferentialSampling
from mgt.sampling.halton import grid_order
from mgt.sampling.noise_regularization import NoiseRegularization
from mgt.sampling.sampler_config import SamplerConfig
from mgt.sampling.z_sampling import MaskedZSampling

# predict(tokens (B, h, w), step_value, guidance) -> (B, h*w, codebook) float32 logits, classifier-free
# guided with scale `guidance` (see apply_guidance), token-major.
Predictor = Callable[[torch.Tensor, int, float], torch.Tensor]
REMASKED = -1  # what a step writes at the positions it re-masks before they become the mask token


@dataclass
class SamplingResult:
    tokens: torch.Tensor  # (B, h, w) int64, no mask token left
    nfe: int  # transformer calls per generation (each one a CFG-batched forward)


def apply_guidance(logits: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance on a `(2B, C, h, w)` ``[uncond; cond]`` batch -> `(B, h*w, C)` float32.

    ``u + s * (c - u)``, the reference's float32 arithmetic. When ``logits`` is float32 the mix is computed
    in place in its ``cond`` half (a model output is not read again), which saves one full-size tensor.
    """
    uncond, cond = logits.float().chunk(2)
    return to_token_major(cond.sub_(uncond).mul_(guidance).add_(uncond))


def to_token_major(logits: torch.Tensor) -> torch.Tensor:
    """`(B, C, h, w)` logits -> contiguous float32 `(B, h*w, C)`, the layout the softmax and draws use."""
    batch, codes = logits.shape[:2]
    return logits.float().reshape(batch, codes, -1).transpose(1, 2).contiguous()


def gumbel_noise(length: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise drawn exactly as diffusers' ``gumbel_noise`` does (uniform_, clamps)."""
    uniform = torch.zeros(length, device=generator.device).uniform_(0, 1, generator=generator).to(device)
    return -torch.log((-torch.log(uniform.clamp(1e-20))).clamp(1e-20))


def draw_tokens(probs: torch.Tensor, tokens: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One multinomial draw per position from each sample's own generator (the caller keeps known tokens).

    Args:
        probs: `(B, L, C)` float32 distributions.
        tokens: `(B, L)` current tokens; the draws are returned on their device.
    """
    drawn = torch.stack([
        torch.multinomial(probs[b].to(generators[b].device), 1, generator=generators[b])[:, 0]
        for b in range(len(generators))
    ]).to(tokens.device)
    return drawn


def draw_tokens_at(probs: torch.Tensor, tokens: torch.Tensor, generators: Sequence[torch.Generator],
                   where: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`draw_tokens` at the ``where`` `(B, L)` positions only; elsewhere ``tokens`` is returned.

    A cached-context local step computes a few positions and keeps the rest (known tokens are context, held ones
    stay masked), so drawing over the whole grid would spend most of its time on draws that are thrown away: the
    multinomial's exponential draw over `(L, C)` was a fifth of the loop's CPU time at 64x64 tokens.
    """
    drawn = tokens.clone()
    for b, generator in enumerate(generators):
        rows = where[b].nonzero()[:, 0]
        if len(rows):
            chosen = tempered(probs[b, rows], temperature).to(generator.device)
            drawn[b, rows] = torch.multinomial(chosen, 1, generator=generator)[:, 0].to(tokens.device)
    return drawn


def tempered(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distributions the token draw uses: ``probs ** (1/temperature)`` renormalised per position.

    1 returns ``probs`` itself (the reference's draw, bit for bit); 0 puts all mass on each position's argmax
    (the multinomial still runs, so every generator advances as at any other temperature). Why a knob: the
    multinomial commits each token as often as the model gives it, so a model unsure of its edges commits
    stray codes there, and a colder draw commits its likeliest ones (docs/samplers.md §2 measures it).
    """
    if temperature == 1.0:
        return probs
    if temperature == 0.0:
        return torch.zeros_like(probs).scatter_(-1, probs.argmax(-1, keepdim=True), 1.0)
    return torch.softmax(probs.clamp_min(1e-30).log_().div_(temperature), dim=-1)


def remask_lowest_confidence(
    drawn: torch.Tensor,
    token_probs: torch.Tensor,
    unknown: torch.Tensor,
    num_to_mask: Sequence[int],
    temperature: torch.Tensor,
    generators: Sequence[torch.Generator],
    mask_token_id: int,
    kept: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    held: torch.Tensor | None = None,
    confidence_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Re-mask the ``num_to_mask[b]`` drawn tokens of lowest annealed-Gumbel confidence.

    Confidence is ``log p(drawn) + temperature * Gumbel``; tokens that were already known get
    ``log(finfo.max)`` so they are never re-masked, as in the reference. An edit's ``kept`` `(B, L)` tokens get
    ``+inf``, so they stay out of reach whatever the temperature (88.7 + t * Gumbel could lose above t ~ 4).

    Args:
        drawn: `(B, L)` tokens after the draw.
        token_probs: `(B, L)` float32 probability of each drawn token.
        unknown: `(B, L)` bool, positions that were masked before the draw.
        noise: `(B, L)` float64 annealed Gumbel noise drawn elsewhere (:func:`numpy_gumbel_noise`) instead of
            ``temperature`` times the generators' Gumbel; known tokens then get ``+inf``.
        held: `(B, L)` bool positions that stay masked (confidence -inf; cached-context local steps).
        confidence_out: `(B, L)` float32 buffer that receives the confidences (cached-context full steps).
    """
    token_probs = torch.where(unknown, token_probs, torch.finfo(token_probs.dtype).max)
    log_probs = torch.log(token_probs.clamp(1e-20))
    out = drawn.clone()
    for b, generator in enumerate(generators):
        if noise is None:
            confidence = log_probs[b] + temperature * gumbel_noise(drawn.shape[1], generator, drawn.device)
        else:  # float64, as the MaskGIT reference adds its numpy noise
            confidence = (log_probs[b] + noise[b].to(drawn.device)).masked_fill_(~unknown[b], torch.inf)
        if kept is not None:
            confidence.masked_fill_(kept[b], torch.inf)
        if held is not None:
            confidence.masked_fill_(held[b], -torch.inf)
        if confidence_out is not None:
            confidence_out[b] = confidence
        cutoff = torch.kthvalue(confidence, num_to_mask[b] + 1).values  # == sort(confidence)[num_to_mask]
        out[b][confidence < cutoff] = mask_token_id
    return out


def numpy_streams(generators: Sequence[torch.Generator]) -> list[np.random.RandomState]:
    """Each sample's numpy stream, ``RandomState(generator.initial_seed())``, as MaskGIT's reference seeds numpy
    with the seed it gives torch (a seed beyond 32 bits is split into two 32-bit words)."""
    seeds = [generator.initial_seed() for generator in generators]
    return [np.random.RandomState(seed if seed < 2**32 else [seed & 0xFFFFFFFF, seed >> 32]) for seed in seeds]


def numpy_gumbel_noise(streams: Sequence[np.random.RandomState], length: int, sampler: SamplerConfig,
                       step_index: int, num_steps: int) -> torch.Tensor:
    """`(B, L)` float64 Gumbel noise of step ``i`` annealed linearly from ``gumbel_temperature[0]`` to ``[1]``,
    ``start * g * (1 - i/(T-1)) + end * g * i/(T-1)``: with end 0 the reference's ``r_temp * g * (1 - i/(T-1))``
    bit for bit (``np.random.gumbel(size=(1, N))`` per sample and step)."""
    start, end = sampler.gumbel_temperature
    progress = step_index / (num_steps - 1)
    rows = []
    for stream in streams:
        g = stream.gumbel(size=(1, length))[0]
        rows.append(start * g * (1 - progress) + end * g * progress)
    return torch.from_numpy(np.stack(rows))


def halton_priorities(height: int, width: int, generators: Sequence[torch.Generator],
                      device: torch.device | str) -> torch.Tensor:
    """`(B, h*w)` float32 rank scores for ``order="halton"``: the Halton order of the grid (see
    :mod:`mgt.sampling.halton`) rolled by an offset drawn from each sample's generator before the loop (as the
    reference ``HaltonSampler``'s ``randomize``), earlier cells scoring higher."""
    base = grid_order(height, width)
    length = base.numel()
    scores = torch.empty(len(generators), length)
    for b, generator in enumerate(generators):
        offset = int(torch.randint(0, length, (1,), generator=generator, device=generator.device))
        scores[b, torch.roll(base, offset)] = -torch.arange(length, dtype=torch.float32)
    return scores.to(device)


def remask_in_order(drawn: torch.Tensor, priorities: torch.Tensor, unknown: torch.Tensor,
                    num_to_mask: Sequence[int], mask_token_id: int, kept: torch.Tensor | None = None) -> torch.Tensor:
    """Re-mask the ``num_to_mask[b]`` newly drawn tokens of lowest ``priorities`` (a fixed order, no noise);
    known tokens, and an edit's ``kept`` ones, are never re-masked."""
    scores = torch.where(unknown, priorities, torch.finfo(priorities.dtype).max)
    if kept is not None:
        scores = scores.masked_fill(kept, torch.inf)
    out = drawn.clone()
    for b in range(drawn.shape[0]):
        cutoff = torch.kthvalue(scores[b], num_to_mask[b] + 1).values
        out[b][scores[b] < cutoff] = mask_token_id
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
    """One step of the reference sampler, ``AmusedScheduler.step``, from the same pieces :func:`sample` uses.

    Args:
        logits: `(B, L, C)` float32 guided logits (token-major, see :func:`to_token_major`).
        tokens: `(B, L)` int64 current tokens.
        step_index: ``i`` in ``0..num_steps-1``.

    Returns:
        `(B, L)` tokens for the next step; at the last step no mask is left.
    """
    unknown = tokens == mask_token_id
    probs = torch.softmax(logits, dim=-1)
    drawn = torch.where(unknown, draw_tokens(tempered(probs, sampler.token_temperature), tokens, generators), tokens)
    if step_index == num_steps - 1:
        return drawn
    num_to_mask = mask_counts(sampler, unknown, step_index, num_steps)
    token_probs = probs.gather(-1, drawn[..., None])[..., 0]
    temperature = gumbel_temperatures(sampler, num_steps)[step_index]
    return remask_lowest_confidence(drawn, token_probs, unknown, num_to_mask, temperature, generators, mask_token_id)


def mask_counts(sampler: SamplerConfig, unknown: torch.Tensor, step_index: int, num_steps: int,
                start_ratio: torch.Tensor | None = None) -> list[int]:
    """``m_i`` of every sample: tokens still masked after step ``step_index``, from the mask schedule.

    ``start_ratio`` `(B,)` float32 scales each sample's schedule (an inpainting mask's share of the grid, as
    ``AmusedScheduler.step``'s ``starting_mask_ratio``).
    """
    schedule = schedules.get_schedule(sampler.mask_schedule, sampler.mask_schedule_power)
    length = unknown.shape[1]
    counts = []
    if sampler.mask_schedule == "arccos_maskgit":  # the step reveals the reference's count, at most what is left
        for b, n in enumerate(unknown.sum(-1).tolist()):
            share = 1.0 if start_ratio is None else float(start_ratio[b])
            counts.append(max(0, n - schedules.maskgit_counts(num_steps, round(length * share))[step_index]))
        return counts
    for b, n in enumerate(unknown.sum(-1).tolist()):
        scaled = schedule if start_ratio is None else _scaled(schedule, start_ratio[b])
        counts.append(schedules.num_to_mask(scaled, step_index, num_steps, length, n))
    return counts


def _scaled(schedule: schedules.MaskSchedule, factor: torch.Tensor) -> schedules.MaskSchedule:
    return lambda ratio: factor * schedule(ratio)  # starting_mask_ratio * mask_ratio, float32 as the reference


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
    guidance: float = 1.0,
    device: torch.device | str = "cpu",
    on_step: Callable[[int], None] | None = None,
    init: torch.Tensor | None = None,
    start_step: int = 0,
    start_ratio: torch.Tensor | None = None,
    cache_patch: int = 1,
) -> SamplingResult:
    """Run the sampler from a fully masked `(B, h, w)` grid, or from ``init``, to final tokens.

    Per step: forward + CFG -> noise regularization on the guided logits -> softmax -> differential sampling
    on the probabilities -> multinomial draw (at ``sampler.token_temperature``) -> re-mask the lowest
    confidences (``log p`` of the untempered draw distribution), or with ``sampler.order == "halton"`` the drawn
    tokens latest in the sample's Halton order. Masked Z-Sampling wraps a
    step with an inversion pass, a re-mask and a re-denoise at the same step. ``predict(tokens, t, s)``
    gets the step value ``t = T-1-i`` that the reference pipeline passes and the step's CFG scale ``s``
    (``guidance`` through ``sampler.guidance_schedule``; ``s_inv`` for the inversion pass).

    Editing (see :mod:`mgt.editing`): ``init`` `(B, h, w)` holds the starting tokens, ``mask_token_id`` where
    tokens are redrawn; only steps ``start_step..T-1`` run, and ``start_ratio`` `(B,)` scales the mask schedule.
    The tokens known in ``init`` are kept: a step only draws masked positions and never re-masks a known token
    (its confidence is the float32 maximum), and Z-Sampling re-masks only the redrawn positions.

    ``sampler.cache`` (:mod:`mgt.sampling.cached_context`) makes ``predict`` take a ``context`` keyword;
    ``cache_patch`` is the side of the token patch one transformer position holds (2 for Meissonic-1024).
    """
    batch, height, width = shape
    if len(generators) != batch:
        raise ValueError(f"need one generator per sample: got {len(generators)} for a batch of {batch}")
    noise = NoiseRegularization.from_config(sampler.noise) if sampler.noise else None
    differential = DifferentialSampling.from_config(sampler.differential) if sampler.differential else None
    zsampling = MaskedZSampling.from_config(sampler.zsampling) if sampler.zsampling else None
    zigzag_steps = zsampling.zigzag_steps(num_steps) if zsampling else 0
    context = CachedContext(sampler.cache, num_steps, zigzag_steps, (height, width), cache_patch) if sampler.cache \
        else None
    temperatures = gumbel_temperatures(sampler, num_steps)
    priorities = halton_priorities(height, width, generators, device) if sampler.order == "halton" else None
    if init is None:
        tokens = torch.full((batch, height * width), mask_token_id, dtype=torch.long, device=device)
    else:
        tokens = init.reshape(batch, height * width).to(device)
    editable = tokens == mask_token_id  # the positions a step or Z-Sampling may re-mask; the rest is kept
    kept = None if bool(editable.all()) else ~editable
    streams = numpy_streams(generators) if sampler.gumbel_noise == "numpy" else None
    probs = None  # the softmax buffer, reused by every step
    nfe = 0

    def step(current: torch.Tensor, unknown: torch.Tensor, i: int,
             num_to_mask: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens after step ``i`` and which of them are still unknown (a drawn mask token, which MaskGIT's
        softmax allows, counts as known, as in its reference)."""
        nonlocal probs, nfe
        scale = schedules.guidance_scale(sampler.guidance_schedule, guidance, i, num_steps)
        if context is None:
            logits = predict(current.view(batch, height, width), num_steps - 1 - i, scale)
        else:  # a full forward that records keys and values, or a local one against them
            logits = context.logits(predict, current.view(batch, height, width), num_steps - 1 - i, scale, i)
        nfe += 1
        if sampler.softmax_temperature != 1.0:
            logits = logits * sampler.softmax_temperature
        if noise is not None:  # differential sampling ranks every position, so then all of them get noise
            noise.perturb_(logits, None if differential else unknown, i, num_steps, generators)
        probs = torch.softmax(logits, dim=-1, out=probs)
        if differential is None:
            dist = probs
        else:  # the logits are spent: their buffer takes the KL terms
            dist = differential(probs, unknown, is_last_step=i == num_steps - 1, scratch=logits)
        if context is None or context.full_now:
            drawn = draw_tokens(tempered(dist, sampler.token_temperature), current, generators)
        else:  # a local step draws where it computed: its other positions are known or held
            drawn = draw_tokens_at(dist, current, generators, context.group & unknown, sampler.token_temperature)
        drawn = torch.where(unknown, drawn, current)
        if i == num_steps - 1:
            return drawn, torch.zeros_like(unknown)
        # re-masked positions get -1 first, so a drawn mask token is told apart from a re-masked position
        if priorities is not None:
            out = remask_in_order(drawn, priorities, unknown, num_to_mask, REMASKED, kept)
        else:
            # a local step's held positions keep the mask token, which may lie past the logits: their confidence
            # is -inf whatever the probability read here
            token_probs = dist.gather(-1, drawn.clamp(max=dist.shape[-1] - 1)[..., None])[..., 0]
            gumbel = None if streams is None else numpy_gumbel_noise(streams, current.shape[1], sampler, i, num_steps)
            if context is None:
                out = remask_lowest_confidence(drawn, token_probs, unknown, num_to_mask, temperatures[i], generators,
                                               REMASKED, kept, gumbel)
            else:  # cached context: held positions stay masked; a full step's confidences choose the next group
                confidence = torch.empty_like(token_probs) if context.full_now else None
                out = remask_lowest_confidence(drawn, token_probs, unknown, context.mask_counts(num_to_mask),
                                               temperatures[i], generators, REMASKED, kept, gumbel,
                                               held=context.held_now, confidence_out=confidence)
                if confidence is not None:
                    masked = out == REMASKED
                    ends = mask_counts(sampler, masked, context.group_end(i), num_steps, start_ratio)
                    context.choose_group(unknown, masked, confidence, ends, i)
        remasked = out == REMASKED
        return out.masked_fill_(remasked, mask_token_id), remasked

    unknown = editable
    for i in range(start_step, num_steps):
        num_to_mask = mask_counts(sampler, unknown, i, num_steps, start_ratio)
        if i < zigzag_steps:  # Z-Sampling: the inversion pass at t_{i+1} and s_inv runs with no technique;
            # the re-denoise keeps the vanilla step's mask count, so the mask schedule is unchanged
            forward, _ = step(tokens, unknown, i, num_to_mask)
            inversion = predict(forward.view(batch, height, width), num_steps - 2 - i, zsampling.inversion_cfg)
            nfe += 1
            tokens = zsampling.remask(tokens, forward, inversion, generators, mask_token_id, editable)
            tokens, unknown = step(tokens, tokens == mask_token_id, i, num_to_mask)
        else:
            tokens, unknown = step(tokens, unknown, i, num_to_mask)
        if on_step is not None:
            on_step(i)
    # A mask token drawn and kept (MaskGIT's softmax includes it) ends as the last code, as its reference clamps.
    tokens = tokens.clamp(max=mask_token_id - 1)
    return SamplingResult(tokens=tokens.view(batch, height, width), nfe=nfe)
