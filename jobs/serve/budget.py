"""The compute a request asks for: model calls (NFE) per image, which the endpoint's budget counts.

A sampling step is one transformer call (a CFG-batched forward), but Masked Z-Sampling (arXiv 2411.10781 §3,
``mgt.sampling.z_sampling``) adds an inversion pass and a re-denoise to each zigzag step, so 8 steps of Z-Sampling are 22
calls, not 8. Counting steps would let a client ask for nearly three times the work the budget allows.
"""

from __future__ import annotations

from mgt.config import GenerationSettings
from mgt.sampling.z_sampling import MaskedZSampling


def model_calls(settings: GenerationSettings, start_step: int = 0) -> int:
    """Transformer calls (NFE) that sampling one image with ``settings`` makes, its ``steps`` resolved.

    One call per step that runs (``start_step..T-1``; an edit starts late), plus two per zigzag step of Masked
    Z-Sampling, which zigzags on steps ``0..lambda-1``: a generation makes ``T + 2 lambda`` calls, ``3T - 2`` at
    the default ``lambda = T - 1``. This is the ``nfe`` the sampling loop (``mgt.sampling.loop``) counts.

    Raises:
        ValueError: the engine's own, for ``zsampling.num_steps`` above ``T - 1``.
    """
    calls = settings.steps - start_step
    if settings.sampler.zsampling is not None:
        zigzag = MaskedZSampling.from_config(settings.sampler.zsampling).zigzag_steps(settings.steps)
        calls += 2 * max(0, zigzag - start_step)
    return calls
