"""Noise regularization, arXiv 2411.10781 §3 (Enhanced Inference): dynamic Gaussian noise on the logits.

The released code (github.com/xie-lab-ml/Bags_of_Tricks_Meissonic @ 6beeec1, ``--add-noise cos``; docs/samplers.md
§3) adds ``sigma_i * eps``, ``eps ~ N(0, I)`` over N x K, to the post-CFG logits before the softmax, with
``sigma_i = 2 |cos(pi i/(T-1))|``; the noisy distribution feeds both the draw and the re-masking confidence.
The reference draws from the global RNG; here each sample's noise comes from its own generator, into one
reused buffer, added in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from mgt.sampling.sampler_config import NoiseRegularizationConfig


def noise_shape(name: str, power: float = 0.6) -> Callable[[float], float]:
    """``f(u)`` of ``sigma(u) = A f(u)``, ``u = i/(T-1)`` in [0, 1] (0 = first, fully masked step)."""
    shapes: dict[str, Callable[[float], float]] = {
        "abs_cos": lambda u: abs(math.cos(math.pi * u)),  # released code: U shape, 1 at both ends, 0 mid-way
        "cos_half": lambda u: math.cos(math.pi * u / 2),
        "linear": lambda u: 1.0 - u,
        "one_minus_pow": lambda u: 1.0 - u**power,
        "const": lambda u: 1.0,
    }
    if name not in shapes:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(shapes)}")
    return shapes[name]


class NoiseRegularization:
    """arXiv 2411.10781 §3: ``logits += A f(i/(T-1)) N(0, I)`` on the post-CFG logits, per sample.

    Args:
        amplitude: ``A`` (released code: 2). 0 draws nothing, so the sampler stays token-exact with vanilla.
        schedule: name of ``f`` (see :func:`noise_shape`; released code: ``abs_cos``).
        power: exponent of the ``one_minus_pow`` schedule.
    """

    def __init__(self, amplitude: float = 2.0, schedule: str = "abs_cos", power: float = 0.6):
        self.amplitude = amplitude
        self.shape = noise_shape(schedule, power)
        self._buffer: torch.Tensor | None = None  # flat noise buffer, reused across samples and steps

    @classmethod
    def from_config(cls, config: NoiseRegularizationConfig) -> NoiseRegularization:
        return cls(config.amplitude, config.schedule, config.power)

    def sigma(self, step_index: int, num_steps: int) -> float:
        """Noise scale of step ``step_index`` of ``num_steps``."""
        progress = step_index / (num_steps - 1) if num_steps > 1 else 0.0
        return self.amplitude * self.shape(progress)

    def perturb_(
        self,
        logits: torch.Tensor,
        rows: torch.Tensor | None,
        step_index: int,
        num_steps: int,
        generators: Sequence[torch.Generator],
    ) -> None:
        """Add the step's noise to ``logits`` in place.

        Args:
            logits: `(B, L, C)` float32 post-CFG logits, token-major.
            rows: `(B, L)` bool, the positions whose logits matter, or None for all of them. Known tokens
                are kept whatever is drawn there, so without differential sampling (which ranks every
                position by KL) only the masked rows need noise: that is cheaper and draws the same
                distribution for every token that is used.
            generators: one per sample; sample ``b`` draws ``rows[b].sum() x C`` normals from its own.
        """
        sigma = self.sigma(step_index, num_steps)
        if sigma == 0:
            return
        batch, length, codes = logits.shape
        if self._buffer is None:
            self._buffer = torch.empty(length * codes, dtype=torch.float32, device=logits.device)
        for b, generator in enumerate(generators):
            index = None if rows is None else rows[b].nonzero()[:, 0]
            count = length if index is None else index.numel()
            noise = self._buffer[: count * codes].view(count, codes)
            torch.randn((count, codes), generator=generator, out=noise)
            if index is None:
                logits[b].add_(noise, alpha=sigma)
            else:
                logits[b].index_add_(0, index, noise, alpha=sigma)
