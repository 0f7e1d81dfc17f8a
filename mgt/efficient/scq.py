"""SCQ, "Secondary Calibration Quantization" (arXiv 2411.10781 §4), with self-distillation calibration data.

The pipeline of the released ``quantization/inference_w4a8_qat.py``: quantize (W4 + A8 on every
Linear) -> calibration #1 -> QAT fine-tune (masked-token cross-entropy, AdamW) -> freeze ->
calibration #2 ("secondary calibration": every activation scale re-estimated on the fine-tuned
weights). The paper's calibration set is not public; as the released data layout suggests, the data
here are the full-precision model's own generations for the given prompts (self-distillation): each
generated token grid is masked training-style (mask ratio cos(pi/2 u), u ~ U(0, 1), at least one
masked token, random positions) and paired into a CFG batch ``[uncond ; prompt]``.

Choice where the reference left room: the released script feeds ``timestep = mask_ratio * 1000`` (the
training convention; the model multiplies by 1000 again). Inference feeds the step value
``T - 1 - i``, so by default (``timestep="inference"``) a calibration batch gets the step value whose
cosine-schedule mask ratio equals its own, and activation ranges match sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from optimum.quanto import freeze
from optimum.quanto.nn import QModuleMixin

from mgt.efficient.quant_config import SCQConfig, get_preset
from mgt.efficient.quantization import CFGCalibration, activation_scales, quantize_transformer, reset_activation_scales
from mgt.models.text import TextConditioner

# progress(stage, done, total): stage is "generate", "calibrate", "qat" or "recalibrate".
Progress = Callable[[str, int, int], None]

# Used when a preset is applied on load without a prompt file (`--quant w4a8`): varied subjects,
# styles and layouts so that activation ranges cover typical prompts.
DEFAULT_CALIBRATION_PROMPTS = (
    "a photo of an astronaut riding a horse on the moon",
    "a red circle above a blue square",
    "a cozy wooden cabin in a snowy forest at night, warm light in the windows",
    "portrait of an old fisherman, dramatic lighting, oil painting",
    "a bowl of ramen with a soft-boiled egg, food photography",
    "a futuristic city skyline at sunset, neon signs, cyberpunk",
    "a watercolor painting of a fox sleeping under a tree",
    "an isometric illustration of a tiny island with a lighthouse",
    "a close-up of a hummingbird drinking from a purple flower",
    "two cats playing chess in a library, digital art",
    "a vintage poster of a hot air balloon festival",
    "a minimalist logo of a mountain and a river",
    "a crowded market street in Marrakech, wide angle photo",
    "a macro shot of dew drops on a spider web at dawn",
    "a knight in shining armor standing on a cliff, fantasy concept art",
    "a green triangle",
)


@dataclass
class CalibrationBatch:
    """A CFG pair ``[uncond ; cond]`` of one masked self-generated token grid."""

    token_ids: torch.Tensor  # (2, h, w) int64 with the mask id at masked positions
    target: torch.Tensor  # (2, h, w) int64 generated tokens
    masked: torch.Tensor  # (2, h, w) bool
    encoder_hidden_states: torch.Tensor  # (2, 77, D)
    pooled_projections: torch.Tensor  # (2, D)
    micro_conds: torch.Tensor  # (2, 5)
    timestep: torch.Tensor  # (1,)

    def run(self, transformer: torch.nn.Module) -> torch.Tensor:
        """`(2, codebook, h, w)` logits of ``transformer`` on this batch."""
        return transformer(self.token_ids, self.encoder_hidden_states, self.pooled_projections, self.micro_conds,
                           self.timestep)


@dataclass
class SCQReport:
    """What :func:`quantize_pipeline` did."""

    preset: str
    calibration_batches: int = 0
    qat_steps: int = 0
    qat_losses: list[float] = field(default_factory=list)
    first_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # after calibration #1 (scq only)


def self_distillation_batches(pipe, prompts: Sequence[str], config: SCQConfig = SCQConfig(),
                              progress: Progress | None = None) -> list[CalibrationBatch]:
    """Generate each prompt with the full-precision ``pipe`` and mask each result ``views_per_prompt`` times."""
    if not prompts:
        raise ValueError("no calibration prompts: give at least one prompt")
    steps = config.generation_steps or pipe.defaults.steps
    width, height = pipe.defaults.width, pipe.defaults.height
    uncond = pipe.defaults.negative_prompt if config.uncond_prompt is None else config.uncond_prompt
    tokens = []
    chunk = 8
    for start in range(0, len(prompts), chunk):
        part = list(prompts[start:start + chunk])
        seeds = [config.seed + start + k for k in range(len(part))]
        tokens.extend(pipe.generate(part, seeds, steps=steps, decode=False).tokens)
        if progress:
            progress("generate", start + len(part), len(prompts))

    dtype, device = pipe.transformer.dtype, pipe.device
    uncond_hidden, uncond_pooled = pipe.conditioner.encode([uncond])
    micro = pipe.conditioner.micro_conds(2, width, height, dtype, device).clone()
    generator = torch.Generator().manual_seed(config.seed)
    batches = []
    for prompt, grid in zip(prompts, tokens):
        hidden, pooled = pipe.conditioner.encode([prompt])
        hidden = torch.cat([uncond_hidden, hidden]).to(device, dtype).clone()  # clone: out of inference mode
        pooled = torch.cat([uncond_pooled, pooled]).to(device, dtype).clone()
        for _ in range(config.views_per_prompt):
            masked, step_value = _training_mask(grid.shape, steps, config.timestep, generator)
            target = grid.to(device).expand(2, -1, -1).clone()
            masked = masked.to(device).expand(2, -1, -1)
            token_ids = torch.where(masked, pipe.mask_token_id, target)
            batches.append(CalibrationBatch(token_ids, target, masked, hidden, pooled, micro,
                                            step_value.to(device)))
    return batches


def _training_mask(shape: torch.Size, steps: int, timestep: str,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Meissonic's training mask: ratio cos(pi/2 u), at least one masked token, random positions."""
    count = shape[0] * shape[1]
    u = torch.rand((), generator=generator).item()
    ratio = math.cos(math.pi / 2 * u)
    masked_count = max(1, round(ratio * count))
    masked = torch.zeros(count, dtype=torch.bool)
    masked[torch.randperm(count, generator=generator)[:masked_count]] = True
    if timestep == "training":
        value = torch.tensor([ratio * 1000.0])
    else:  # inference step i has mask ratio cos(pi/2 i/T) and step value T-1-i
        step_index = 2 / math.pi * math.acos(min(1.0, masked_count / count)) * steps
        value = torch.tensor([min(steps - 1, max(0, round(steps - 1 - step_index)))])
    return masked.reshape(shape), value


@torch.no_grad()
def calibrate(transformer: torch.nn.Module, batches: Sequence[CalibrationBatch], momentum: float = 0.9,
              progress: Progress | None = None, stage: str = "calibrate") -> None:
    """Estimate every per-CFG-half activation scale on ``batches`` (quanto calibration mode)."""
    with CFGCalibration(momentum=momentum):
        for done, batch in enumerate(batches, 1):
            batch.run(transformer)
            if progress:
                progress(stage, done, len(batches))


def qat_finetune(transformer: torch.nn.Module, batches: Sequence[CalibrationBatch], config: SCQConfig,
                 progress: Progress | None = None) -> list[float]:
    """QAT: AdamW on the masked-token cross-entropy, weights fake-quantized (straight-through), in fp32.

    Returns the loss of every step. The model goes back to its dtype, in eval mode, without gradients.
    """
    accumulation = min(config.qat_accumulation, len(batches))
    steps = math.ceil(len(batches) / accumulation) if config.qat_steps is None else config.qat_steps
    dtype = transformer.dtype
    if dtype != torch.float32:
        transformer.float()
    transformer.train().requires_grad_(True)
    hooks = [m.register_forward_hook(_contiguous_grad_hook) for m in transformer.modules()
             if isinstance(m, QModuleMixin)]
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.qat_lr, weight_decay=config.qat_weight_decay)
    losses = []
    for step in range(steps):
        total = 0.0
        for k in range(accumulation):
            batch = batches[(step * accumulation + k) % len(batches)]
            logits = transformer(batch.token_ids, batch.encoder_hidden_states.float(),
                                 batch.pooled_projections.float(), batch.micro_conds.float(), batch.timestep)
            loss = F.cross_entropy(logits.permute(0, 2, 3, 1)[batch.masked], batch.target[batch.masked])
            (loss / accumulation).backward()
            total += loss.item() / accumulation
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        if progress:
            progress("qat", step + 1, steps)
    for hook in hooks:
        hook.remove()
    if dtype != torch.float32:
        transformer.to(dtype)
    transformer.eval().requires_grad_(False)
    return losses


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    optimum-quanto 0.2.7's quantized-linear backward (``tensor/function.py``) calls ``.view`` on the
    output gradient, which fails when a later ``permute`` (Meissonic's un-flattening of the token grid,
    the attention head split) left it non-contiguous.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _contiguous_grad_hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(output)


def quantize_pipeline(pipe, preset: str, prompts: Sequence[str] | None = None, config: SCQConfig = SCQConfig(),
                      progress: Progress | None = None) -> SCQReport:
    """Quantize ``pipe.transformer`` in place with ``preset``, calibrating on ``pipe``'s own generations.

    Args:
        pipe: a full-precision :class:`mgt.pipeline.MGTPipeline`; it generates its own calibration data.
        preset: w8a16, w4a16, w8a8, w4a8 or scq (see :mod:`mgt.efficient.quantization`).
        prompts: calibration prompts (A8 presets); None uses ``DEFAULT_CALIBRATION_PROMPTS``.
    """
    batches = []
    if get_preset(preset).calibrate:
        if not isinstance(pipe.conditioner, TextConditioner):
            raise ValueError(f"{preset} calibrates the activations on text conditioning (CLIP states, micro-conditions)"
                             f"; a {pipe.family} model is conditioned otherwise: use a weight-only preset (w8a16, w4a16)")
        batches = self_distillation_batches(pipe, prompts or DEFAULT_CALIBRATION_PROMPTS, config, progress)
    return apply_preset(pipe.transformer, preset, batches, config, progress)


def apply_preset(transformer: torch.nn.Module, preset: str, batches: Sequence[CalibrationBatch],
                 config: SCQConfig = SCQConfig(), progress: Progress | None = None) -> SCQReport:
    """Quantize a full-precision ``transformer`` in place and run the preset's calibration steps on ``batches``.

    quantize -> [calibration #1] -> [QAT fine-tune] -> freeze -> [calibration #2 on the fine-tuned weights].
    """
    spec = get_preset(preset)
    if spec.calibrate and not batches:
        raise ValueError(f"preset {preset} calibrates its int8 activations: give calibration batches")
    report = SCQReport(preset, calibration_batches=len(batches) if spec.calibrate else 0)
    quantize_transformer(transformer, preset)
    if spec.calibrate:
        calibrate(transformer, batches, config.momentum, progress)
    if spec.secondary:
        report.first_scales = activation_scales(transformer)
        if config.qat_steps != 0:
            report.qat_losses = qat_finetune(transformer, batches, config, progress)
            report.qat_steps = len(report.qat_losses)
    freeze(transformer)
    if spec.secondary:  # calibration #2 on the fine-tuned, frozen weights
        reset_activation_scales(transformer)
        calibrate(transformer, batches, config.momentum, progress, stage="recalibrate")
    return report
