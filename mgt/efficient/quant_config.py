"""Typed settings of the quantization presets and of SCQ calibration (arXiv 2411.10781 §4), without torch.

The CLI builds ``maskray quantize`` flags from :class:`SCQConfig`; :mod:`mgt.efficient.quantization` and
:mod:`mgt.efficient.scq` hold the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Preset:
    """What a preset quantizes and which calibration steps it runs."""

    weights: str  # quanto qtype name
    activations: bool  # int8 inputs with per-CFG-half scales
    calibrate: bool  # calibration #1 on self-distillation data
    secondary: bool  # QAT fine-tune (optional) then calibration #2 on the fine-tuned weights


PRESETS: dict[str, Preset] = {
    "w8a16": Preset("qint8", activations=False, calibrate=False, secondary=False),
    "w4a16": Preset("qint4", activations=False, calibrate=False, secondary=False),
    "w8a8": Preset("qint8", activations=True, calibrate=True, secondary=False),
    "w4a8": Preset("qint4", activations=True, calibrate=True, secondary=False),
    "scq": Preset("qint4", activations=True, calibrate=True, secondary=True),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown quantization preset {name!r}; choose one of {', '.join(PRESETS)} "
                         "or give the path/URI of a checkpoint written by `maskray quantize`")
    return PRESETS[name]


class SCQConfig(BaseModel):
    """Calibration data, calibration and QAT settings of the quantization presets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    views_per_prompt: int = Field(4, ge=1, description="Training-style masked copies of each generated image, "
                                  "i.e. calibration batches per prompt (the released script runs ~501 batches).")
    generation_steps: int | None = Field(None, ge=1, description="Sampling steps of the full-precision "
                                         "self-distillation generations (None: the model's default).")
    uncond_prompt: str | None = Field(None, description="Prompt of the unconditional CFG half of calibration "
                                      "batches (None: the model's negative prompt, as at inference; the released "
                                      "script used the empty prompt).")
    timestep: Literal["inference", "training"] = Field("inference", description="Step value fed with a "
                                                       "calibration batch: the inference step whose mask ratio "
                                                       "matches, or mask_ratio*1000 as in the released script.")
    momentum: float = Field(0.9, gt=0, lt=1, description="EMA momentum of the activation scales.")
    qat_steps: int | None = Field(None, ge=0, description="scq only: AdamW steps of the QAT fine-tune (None: one "
                                  "pass over the calibration batches; 0: no fine-tune).")
    qat_accumulation: int = Field(32, ge=1, description="scq only: calibration batches accumulated per QAT step.")
    qat_lr: float = Field(5e-6, gt=0, description="scq only: AdamW learning rate of the QAT fine-tune.")
    qat_weight_decay: float = Field(0.01, ge=0, description="scq only: AdamW weight decay of the QAT fine-tune.")
    seed: int = Field(0, description="Seed of the generations (seed + prompt index) and of the masking.")


def check_compile(compile: bool, quant: str | None) -> None:
    """Refuse ``compile`` with ``quant``: optimum-quanto's quantized tensors break torch.compile's graph."""
    if compile and quant:
        raise ValueError(f"compile cannot be combined with quant={quant!r}: optimum-quanto 0.2.7's quantized "
                         "tensors are tensor subclasses torch.compile cannot trace, so every quantized Linear "
                         "breaks the compiled graph and nothing is gained; drop --compile or --quant")
