"""Quantization presets for the transformer's ``nn.Linear`` layers with optimum-quanto (arXiv 2411.10781 §4).

Presets (docs/samplers.md §8; only W4A8 is scripted in the released code, the others are built the same way):

========  ==================================  ======================================================
preset    weights                             activations (inputs of every Linear)
========  ==================================  ======================================================
w8a16     qint8, per output channel, absmax   model dtype
w4a16     qint4, groups of 128, affine (Max)  model dtype
w8a8      qint8, per output channel, absmax   qint8, one calibrated absmax scale per CFG half
w4a8      qint4, groups of 128, affine (Max)  qint8, one calibrated absmax scale per CFG half
scq       as w4a8                             as w4a8, calibrated, QAT fine-tuned, re-calibrated
========  ==================================  ======================================================

Convolutions, norms, embeddings, the text encoder and the VQ model keep their precision. quanto picks
the int4 group size: 128, reduced in steps of 32 until it divides ``in_features``, and per output
channel when ``in_features <= 128`` (the tiny test models).

**Extension of quanto: per-CFG-half activation scales.** quanto quantizes activations per tensor with
one scalar scale. The released SCQ code patched quanto so that every A8 scale has shape (2, 1): one
scale for the unconditional and one for the conditional half of the classifier-free-guidance batch
(axis 0). :class:`CFGQLinear` is quanto's ``QLinear`` with ``input_scale`` of shape (2, 1), and
:class:`CFGCalibration` is quanto's ``Calibration`` mode estimating each half's absmax. The rows of a
batch map to scales as follows:

* an even batch ``[uncond_1..uncond_B ; cond_1..cond_B]`` (every CFG batch of the pipeline): the
  first half uses scale 0, the second half scale 1;
* an odd batch (a row shared by all samples, such as the time embedding of the `(1,)` timestep, or
  sampling without CFG): the conditional scale 1. Calibration updates both scales from such rows.

A non-CFG batch of even size is therefore quantized as if it were a CFG pair; with CFG (every family
default) scales never depend on the batch contents, so batch invariance holds.

Only layer *inputs* are quantized. The released code also quantizes outputs but runs quanto's
"streamline" rule, which disables output quantization when a layer's output only feeds
non-quantized ops; in Meissonic every Linear output feeds a norm, an activation, a gate, attention
or a residual add, so no output stays quantized. The emulation dequantizes right after quantizing
(quanto's A8 is emulated on CPU as well): memory savings come from the weights, speed from kernels.
"""

from __future__ import annotations

import torch
from optimum.quanto import Calibration, QLinear, absmax_scale, qint4, qint8
from optimum.quanto.nn import QModuleMixin
from optimum.quanto.quantize import set_module_by_name
from optimum.quanto.tensor import quantize_activation

from mgt.efficient.quant_config import get_preset

CONDITIONAL = 1  # index of the conditional half's scale, used by odd batches


def _scale_rows(x: torch.Tensor) -> list[tuple[slice, int]]:
    """(rows, scale index) pairs: the two halves of an even batch, else all rows on the conditional scale."""
    batch = x.shape[0]
    if batch % 2:
        return [(slice(0, batch), CONDITIONAL)]
    return [(slice(0, batch // 2), 0), (slice(batch // 2, batch), 1)]


class MGTQLinear(QLinear):
    """quanto's ``QLinear``, also callable under ``torch.inference_mode`` (the pipeline's mode).

    optimum-quanto 0.2.7 raises "Cannot set version_counter for inference tensor" when an int4 weight
    created outside inference mode is used inside it (huggingface/optimum-quanto#304, closed unfixed);
    the matmul therefore runs with inference mode off and gradients off, which returns the same values.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.is_inference_mode_enabled():
            return super().forward(input)
        with torch.inference_mode(False), torch.no_grad():
            return super().forward(input)


class CFGQLinear(MGTQLinear):
    """quanto ``QLinear`` whose int8 input scale has shape (2, 1): one per CFG half (see module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.disable_output_quantization()  # streamline: outputs only feed non-quantized ops
        self.input_scale = torch.ones(2, 1, dtype=self.input_scale.dtype, device=self.input_scale.device)

    def quantize_input(self, module: torch.nn.Module, input: tuple) -> torch.Tensor:
        """Forward pre-hook: quantize-dequantize each half with its own scale (straight-through grads)."""
        x = input[0]
        parts = [quantize_activation(x[rows], qtype=self.activation_qtype,
                                     scale=self.input_scale[index, 0].to(x.dtype)).dequantize()
                 for rows, index in _scale_rows(x)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class CFGCalibration(Calibration):
    """quanto's ``Calibration`` mode with per-CFG-half absmax input scales for :class:`CFGQLinear`.

    Scales follow an exponential moving average with ``momentum`` (0.9 as released); the first
    observation replaces the initial scale of 1, as in quanto.
    """

    def __init__(self, momentum: float = 0.9):
        super().__init__(momentum=momentum, streamline=False)

    def calibrate_input(self, module: torch.nn.Module, input: tuple, momentum: float = 0.9):
        if not isinstance(module, CFGQLinear):
            return super().calibrate_input(module, input, self.momentum)
        x = input[0].detach()
        if x.shape[0] % 2:  # a row shared by every sample (the timestep embedding): both halves see it
            observations = [(x, 0), (x, 1)]
        else:
            half = x.shape[0] // 2
            observations = [(x[:half], 0), (x[half:], 1)]
        scale = module.input_scale.clone()
        for rows, index in observations:
            observed = absmax_scale(rows, module.activation_qtype).to(scale.dtype)
            previous = scale[index, 0]
            scale[index, 0] = observed if previous == 1 else self.momentum * previous + (1 - self.momentum) * observed
        module.input_scale = scale
        return input


def linear_names(model: torch.nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` (quantized or not) of ``model``."""
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def qlinear_class(activations: str) -> type[MGTQLinear]:
    """The module class for a quantization-map entry's activation qtype (``none`` or ``qint8``)."""
    if activations == "none":
        return MGTQLinear
    if activations == "qint8":
        return CFGQLinear
    raise ValueError(f"unsupported activation qtype {activations!r} in the quantization map; expected none or qint8")


def quantize_transformer(model: torch.nn.Module, preset: str) -> torch.nn.Module:
    """Replace every ``nn.Linear`` of ``model`` in place by its quanto counterpart for ``preset``.

    Weights stay float (quantized on the fly, straight-through for QAT) until :func:`optimum.quanto.freeze`.
    """
    spec = get_preset(preset)
    weights = {"qint8": qint8, "qint4": qint4}[spec.weights]
    activations = qint8 if spec.activations else None
    cls = CFGQLinear if spec.activations else MGTQLinear
    for name in linear_names(model):
        module = model.get_submodule(name)
        if isinstance(module, QModuleMixin):
            raise ValueError(f"{name} is already quantized; quantize a full-precision transformer")
        qmodule = cls.from_module(module, weights=weights, activations=activations)
        qmodule.name = name
        set_module_by_name(model, name, qmodule)
    return model


def activation_scales(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`(2, 1)` input scale of every per-CFG-half A8 layer, by module name (copies)."""
    return {name: m.input_scale.detach().clone() for name, m in model.named_modules() if isinstance(m, CFGQLinear)}


def reset_activation_scales(model: torch.nn.Module) -> None:
    """Back to quanto's initial scale of 1, so the next calibration starts from its first observation."""
    for module in model.modules():
        if isinstance(module, CFGQLinear):
            module.input_scale = torch.ones_like(module.input_scale)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model saves (quantized data, scales, shifts and float tensors)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
