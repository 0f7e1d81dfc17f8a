"""Typed model and generation settings, shared by the CLI, YAML files, Ray jobs and HTTP requests.

These pydantic models hold the only copy of each default and its help text; the CLI builds its flags
from them (``jobs/cli_args.py``) and every config file parses into them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mgt.efficient.quant_config import check_compile
from mgt.sampling.sampler_config import SamplerConfig

if TYPE_CHECKING:
    from mgt.editing import Edit
    from mgt.pipeline import GenerationOutput, MGTPipeline


class ModelConfig(BaseModel):
    """Which model to load and where it runs."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = Field("tiny-meissonic", description="Registered name (random-weight tiny-meissonic, "
                       "tiny-monetico, tiny-amused, tiny-maskgit; maskgit-256 and maskgit-512, built once from "
                       "llvictorll/Maskgit-pytorch; or a model a plugin registers under maskray.models), "
                       "local folder in the hub layout, s3:// or gs:// URI, or hub id such as MeissonFlow/Meissonic.")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Weights and activations precision of the "
                                                   "transformer and text encoder (sampling math is always fp32).")
    device: str = Field("auto", description="cpu, cuda, cuda:N, or auto (a GPU if one is visible, else CPU).")
    variant: str | None = Field(None, description="Weight file variant, e.g. fp16 for *.fp16.safetensors.")
    quant: str | None = Field(None, description="Quantize the transformer (arXiv 2411.10781 §4): a preset (w8a16, "
                              "w4a16, w8a8, w4a8, scq; A8 presets calibrate on built-in prompts while loading) or "
                              "the path/URI of a checkpoint written by `maskray quantize`.")
    tome: float = Field(0.0, ge=0, le=0.75, description="TomeMGT ratio rho of image tokens merged in the dual-stream "
                        "blocks (arXiv 2411.10781 §4; 0 = off, the paper's default is 0.25, 0.75 the maximum).")
    tome_reuse: int = Field(5, ge=1, description="Dual-stream blocks sharing one TomeMGT merge plan (1 = recompute "
                            "the plan in every block).")
    micro_batch: int | None = Field(1, ge=1, description="Samples per transformer forward, each with its CFG pair. "
                                    "1 keeps every image bit-identical whether generated alone or in a batch "
                                    "(matmuls over other row counts take other kernels); unset runs the whole "
                                    "batch in one forward (faster on big GPUs; sensitive samplers may then "
                                    "give other tokens in another batch).")
    compile: bool = Field(False, description="torch.compile the transformer's repeated blocks (mode "
                          "max-autotune-no-cudagraphs on CUDA, default on CPU). The first batch of each shape "
                          "compiles (minutes on a GPU); blocks patched by TomeMGT stay eager; not combinable "
                          "with quant.")

    @model_validator(mode="after")
    def _compile_without_quant(self) -> ModelConfig:
        check_compile(self.compile, self.quant)
        return self


class GenerationSettings(BaseModel):
    """Per-image generation settings; None means the model's default (its `_maskray_defaults` or family)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int | None = Field(None, ge=1, description="Sampling steps T; unset: the model's default (Meissonic 64, "
                                 "aMUSEd 12, or the model folder's own).")
    guidance: float | None = Field(None, ge=0, description="Classifier-free guidance scale; CFG runs when > 1; "
                                   "unset: the model's default (Meissonic 9, aMUSEd 10, or the model folder's own).")
    width: int | None = Field(None, gt=0, description="Image width in pixels (multiple of the VQ scale factor, "
                              "x2 when the transformer down-samples); unset: the model's default.")
    height: int | None = Field(None, gt=0, description="Image height in pixels (same rule as width).")
    negative_prompt: str | None = Field(None, description="Negative prompt for the unconditional CFG branch; "
                                        "unset: the model's default (Meissonic: the reference negative prompt; "
                                        "aMUSEd: empty; or the model folder's own).")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="Sampler (arXiv 2411.10781): a preset "
                                   "(vanilla, noise, differential, zsampling, zsampling+noise, zsampling+differential, "
                                   "noise+differential or all), optionally with overrides PRESET:key=value,... on "
                                   "dotted SamplerConfig fields, e.g. 'zsampling+noise:noise.amplitude=1.5,"
                                   "zsampling.inversion_cfg=0.5'; or a mapping (JSON object) of SamplerConfig "
                                   "fields. Every field at its default is vanilla.")

    @field_validator("sampler", mode="before")
    @classmethod
    def _parse_sampler(cls, value):
        return SamplerConfig.from_spec(value) if isinstance(value, (str, dict)) else value

    def check_sampler_steps(self) -> None:
        """Raise the engine's own ValueError when the sampler cannot run ``steps`` steps (Masked Z-Sampling
        zigzags on at most T-1 of them); unset steps are the model's and are checked when it is loaded."""
        if self.steps is not None and self.sampler.zsampling is not None:
            from mgt.sampling.z_sampling import MaskedZSampling

            MaskedZSampling.from_config(self.sampler.zsampling).zigzag_steps(self.steps)

    def generate(self, pipe: MGTPipeline, prompts: Sequence[str], seeds: Sequence[int], *,
                 negative_prompts: Sequence[str | None] | str | None = None,
                 on_step: Callable[[int], None] | None = None,
                 edits: Sequence[Edit | None] | None = None) -> GenerationOutput:
        """``pipe.generate`` of one image per (prompt, seed) with these settings.

        Args:
            negative_prompts: per-prompt negative prompts replacing ``negative_prompt`` (None in the list: the
                family default); None uses ``negative_prompt``.
            on_step: called with the step index after each step (progress bars, cancellation).
            edits: per-prompt image edits (``mgt.editing.Edit``; None in the list: a plain generation).
        """
        return pipe.generate(prompts, seeds,
                             negative_prompts=self.negative_prompt if negative_prompts is None else negative_prompts,
                             steps=self.steps, guidance=self.guidance, width=self.width, height=self.height,
                             sampler=self.sampler, on_step=on_step, edits=edits)
