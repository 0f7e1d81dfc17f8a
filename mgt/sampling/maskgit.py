"""MaskGIT's two samplers as valeoai/Maskgit-pytorch (MIT) runs them: confidence order and Halton order.

- :func:`confidence_sample`, ``revision="v1.0"``: ``MaskGIT.sample`` of ``Trainer/vit.py`` at commit
  674ef1d934963b7550ad9068015e705a525ceecb (tag v1.0, the sampler of the released ``llvictorll/Maskgit-pytorch``
  weights and of the README's settings, :data:`SETTINGS_256` / :data:`SETTINGS_512`).
- :func:`confidence_sample`, ``revision="v2.0"``: ``ConfidenceSampler`` of ``Sampler/confidence_sampler.py`` at
  commit 5ffd61f7dde5bfab5aa664d86039db0ac4ddde6f (main). It differs from v1.0 in three ways: its schedule is a
  cumulative count ``max(int((1 - arccos(linspace(0, 1, T)_i) / (pi/2)) * N), i + 1)`` (v1.0: per-step counts
  ``round(v_i / sum(v) * N)`` of ``v = arccos(linspace(1, 0, T)) / (pi/2)``, zeros raised to 1, the remainder
  added to the last step); already known tokens get confidence +inf instead of -inf and are therefore *re-drawn*
  and overwritten at every step; and a position whose drawn token is the mask token stays unknown (v1.0 marks it
  known and the final clamp turns it into code ``codebook_size - 1``).
- :func:`halton_sample`: ``HaltonSampler`` of ``Sampler/halton_sampler.py`` at commit 5ffd61f (main): after step
  ``i`` the first :func:`mgt.sampling.halton.revealed_count` cells of the Halton order are known, every one of them
  re-drawn at each step; constant CFG; softmax temperature ``linspace(min, max, T)_i ** power``.

Randomness is per sample (``generators[b]``) and equals the reference's for one sample seeded as its
``main.py`` seeds (``torch.manual_seed(s); np.random.seed(s)``) when ``generators[0]`` is
``torch.Generator().manual_seed(s)``: the token draw is ``torch.distributions.Categorical(probs).sample()`` =
``torch.multinomial`` over `(N, C)`, from the torch generator; the confidence Gumbel noise is numpy's legacy
``np.random.gumbel`` (float64), from ``numpy.random.RandomState(s)`` with ``s = generators[b].initial_seed()``;
the Halton roll is ``torch.randint(0, N, (1,))`` from the torch generator, drawn before the loop. The reference
draws each of these for its whole batch at once from global generators, so for a batch of more than one sample
it cannot be reproduced by per-sample streams: sample ``b`` of a reference batch reads the streams after the
draws of samples ``0..b-1``. Here every sample's tokens are those it gets alone (batch-invariant).
Token logits include the mask token, as in the reference. CPU runs in float32 equal the reference bit for bit;
the reference runs its transformer under CUDA autocast (float16) on GPUs, which is a dtype choice here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mgt.models.maskgit import MaskGitTransformer
from mgt.sampling.halton import halton_order, revealed_count
from mgt.sampling.schedules import maskgit_counts


@dataclass(frozen=True)
class ConfidenceSettings:
    """The confidence sampler's settings (reference argument names in brackets).

    ``softmax_temperature`` *multiplies* the logits (``sm_temp``); the Gumbel noise added to the log-confidence
    is ``gumbel_temperature * g * (1 - i / (T - 1))`` (``r_temp``, randomize "linear"); the guidance is ramped,
    ``(1 + w_i) c - w_i u`` with ``w_i = guidance * i / (T - 1)`` (``w``); the mask schedule is arccos.
    """

    steps: int = 8
    softmax_temperature: float = 1.0
    gumbel_temperature: float = 4.5
    guidance: float = 3.0
    revision: Literal["v1.0", "v2.0"] = "v1.0"


SETTINGS_256 = ConfidenceSettings(steps=8, gumbel_temperature=4.5, guidance=3.0)  # reference README, 256 px
SETTINGS_512 = ConfidenceSettings(steps=15, gumbel_temperature=7.0, guidance=2.8)  # reference README, 512 px


@dataclass(frozen=True)
class HaltonSettings:
    """The Halton sampler's settings; defaults are the reference README's (``HaltonSampler(...)`` there).

    Temperature of step ``i``: ``linspace(min, max, T)_i ** power`` (halved during the first
    ``warmup_steps``), multiplying the logits; constant guidance ``(1 + w) c - w u``; ``randomize`` rolls the
    Halton order by a random offset per sample.
    """

    steps: int = 32
    softmax_temperature_min: float = 1.0
    softmax_temperature_max: float = 1.2
    temperature_power: float = 1.0
    warmup_steps: int = 0
    guidance: float = 2.0
    randomize: bool = True


def _numpy_stream(generator: torch.Generator) -> np.random.RandomState:
    """The sample's numpy stream: ``RandomState(seed)`` as the reference's ``np.random.seed(seed)`` (a seed
    beyond 32 bits is split into two 32-bit words, which numpy's integer seeding refuses)."""
    seed = generator.initial_seed()
    return np.random.RandomState(seed if seed < 2**32 else [seed & 0xFFFFFFFF, seed >> 32])


def _token_logits(model: MaskGitTransformer, tokens: torch.Tensor, labels: torch.Tensor,
                  guidance: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-major float32 `(B, N, C)` logits: (conditional, unconditional), one CFG-batched forward.

    With ``guidance == 0`` only the conditional forward runs and the second item is None (as the reference).
    """
    batch = tokens.shape[0]
    keep = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    if guidance == 0:
        logits = model(tokens, labels, keep)
    else:
        logits = model(torch.cat([tokens, tokens]), torch.cat([labels, labels]), torch.cat([keep, ~keep]))
    logits = logits.float().flatten(2).transpose(1, 2).contiguous()
    return (logits, None) if guidance == 0 else tuple(logits.chunk(2))


def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """`(B, N)` tokens drawn from `(B, N, C)` probabilities, row ``b`` from ``generators[b]`` alone.

    ``torch.distributions.Categorical(probs).sample()`` for one sample: normalise, then multinomial over (N, C).
    """
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.stack([torch.multinomial(row, 1, True, generator=gen).view(-1)
                        for row, gen in zip(probs, generators, strict=True)])


def confidence_schedule(steps: int, num_tokens: int, revision: Literal["v1.0", "v2.0"]) -> list[int]:
    """Tokens revealed at each step (v1.0) or known after each step (v2.0, before ``max(t, i + 1)``)."""
    if revision == "v1.0":
        return maskgit_counts(steps, num_tokens)
    share = 1 - (torch.arccos(torch.linspace(0, 1, steps)) / (math.pi * 0.5))
    return (share * num_tokens).int().tolist()


@torch.no_grad()
def confidence_sample(model: MaskGitTransformer, class_labels: torch.Tensor, generators: Sequence[torch.Generator],
                      settings: ConfidenceSettings = SETTINGS_256,
                      init_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """MaskGIT's confidence sampler: `(B, side, side)` codes in ``[0, codebook_size)``.

    Args:
        model: the transformer, in eval mode.
        class_labels (`torch.LongTensor` of shape `(B,)`): the class of each sample.
        generators: one ``torch.Generator`` per sample (seeded; see the module docstring).
        settings: steps, temperatures, guidance and the reference revision.
        init_tokens (`torch.LongTensor` of shape `(B, side, side)`, *optional*): start codes, the mask token where
            unknown (editing); not modified. Defaults to all masked.
    """
    batch, side, mask_id = class_labels.shape[0], model.config.tokens_per_side, model.mask_token_id
    num_tokens, steps = side * side, settings.steps
    if not 2 <= steps <= num_tokens:
        raise ValueError(f"steps={steps}: the confidence sampler needs 2 <= steps <= {num_tokens} (the tokens)")
    code = (torch.full((batch, num_tokens), mask_id, device=class_labels.device) if init_tokens is None
            else init_tokens.reshape(batch, num_tokens).clone())
    unknown = code == mask_id
    gumbel_streams = [_numpy_stream(gen) for gen in generators]
    schedule = confidence_schedule(steps, num_tokens, settings.revision)
    for i, count in enumerate(schedule):
        w = settings.guidance * (i / (steps - 1))
        logit_c, logit_u = _token_logits(model, code.view(batch, side, side), class_labels, settings.guidance)
        logit = logit_c if logit_u is None else (1 + w) * logit_c - w * logit_u
        prob = torch.softmax(logit * settings.softmax_temperature, -1)
        pred = _draw(prob, generators)
        conf = torch.gather(prob, -1, pred.unsqueeze(-1)).squeeze(-1)
        for b, stream in enumerate(gumbel_streams):
            noise = settings.gumbel_temperature * stream.gumbel(size=(1, num_tokens)) * (1 - i / (steps - 1))
            noisy = torch.log(conf[b]) + torch.from_numpy(noise[0]).to(conf.device)  # float64, as the reference
            if settings.revision == "v1.0":
                k = min(count, int(unknown[b].sum()))  # the reference clamps by the batch's total (same for B=1)
                if k == 0:
                    continue
                noisy[~unknown[b]] = -math.inf
                top, indices = torch.topk(noisy, k=k)
                chosen = unknown[b] & (noisy >= top[-1])
                code[b, chosen] = pred[b, chosen]
                unknown[b, indices] = False
            else:
                noisy[~unknown[b]] = math.inf
                top, _ = torch.topk(noisy, k=max(count, i + 1))
                chosen = noisy >= top[-1]
                code[b, chosen] = pred[b, chosen]
                unknown[b] = code[b] == mask_id
        if settings.revision == "v1.0" and not unknown.any():
            break  # the reference stops once every token is known (only editing starts part-known)
    return code.clamp(0, model.config.codebook_size - 1).view(batch, side, side)


@torch.no_grad()
def halton_sample(model: MaskGitTransformer, class_labels: torch.Tensor, generators: Sequence[torch.Generator],
                  settings: HaltonSettings = HaltonSettings(),
                  init_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """MaskGIT with the Halton scheduler: `(B, side, side)` codes in ``[0, codebook_size)``.

    Arguments as :func:`confidence_sample`. As in the reference, ``init_tokens`` only sets the first input: the
    first ``revealed_count`` Halton cells are drawn at every step whether known at the start or not.
    """
    batch, side, mask_id = class_labels.shape[0], model.config.tokens_per_side, model.mask_token_id
    num_tokens, steps = side * side, settings.steps
    if not 1 <= steps <= num_tokens:
        raise ValueError(f"steps={steps}: the Halton sampler needs 1 <= steps <= {num_tokens} (the tokens)")
    code = (torch.full((batch, num_tokens), mask_id, device=class_labels.device) if init_tokens is None
            else init_tokens.reshape(batch, num_tokens).clone())
    base = halton_order(side, side)
    base = base[:, 0] * side + base[:, 1]  # flat positions
    orders = [torch.roll(base, int(torch.randint(0, num_tokens, (1,), generator=gen)), 0) if settings.randomize
              else base for gen in generators]
    temperatures = torch.linspace(settings.softmax_temperature_min, settings.softmax_temperature_max, steps)
    for i in range(steps):
        known = revealed_count(i, steps, num_tokens)
        reveal = torch.zeros(batch, num_tokens, dtype=torch.bool, device=code.device)
        for b, order in enumerate(orders):
            reveal[b, order[:known].to(code.device)] = True
        temperature = temperatures[i] ** settings.temperature_power
        if i < settings.warmup_steps:
            temperature *= 0.5
        logit_c, logit_u = _token_logits(model, code.view(batch, side, side), class_labels, settings.guidance)
        w = settings.guidance
        logit = logit_c if logit_u is None else (1 + w) * logit_c - w * logit_u
        pred = _draw(torch.softmax(logit * temperature.to(logit.device), -1), generators)
        code[reveal] = pred[reveal]
    return code.clamp(0, model.config.codebook_size - 1).view(batch, side, side)
