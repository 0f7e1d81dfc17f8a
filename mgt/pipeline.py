"""Text-to-image generation with a masked generative transformer: condition -> sample tokens -> VQ decode.

``MGTPipeline.generate`` reads top to bottom like the reference pipelines (Meissonic ``src/pipeline.py``,
diffusers ``AmusedPipeline``): validate, condition on prompt and negative prompt (the family's conditioner:
CLIP text and micro-conditions for Meissonic and aMUSEd), run the sampler with one generator per sample,
decode with the VQ model. What differs between model families comes from their row of the family table
(:mod:`mgt.models.families`). Edits (img2img, inpainting,
outpainting; :mod:`mgt.editing`) run the same loop from their image's tokens.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
from diffusers import VQModel

from mgt import editing
from mgt.editing import Edit
from mgt.efficient import options as efficient
from mgt.efficient.quant_config import check_compile
from mgt.efficient.recap_sampling import cached_guided_logits, check_cached_context
from mgt.hub import loading
from mgt.models.families import Conditioner, ModelFamily, detect_family, get_family
from mgt.sampling import loop as sampling
from mgt.sampling import schedules
from mgt.sampling.cached_context import ContextRequest
from mgt.sampling.sampler_config import SamplerConfig


@dataclass(frozen=True)
class ModelDefaults:
    """Generation settings a model family ships with; a model folder may override them."""

    steps: int
    guidance: float
    negative_prompt: str
    width: int
    height: int
    # SamplerConfig fields this family samples with when a sampler leaves them at the engine's default
    # (MaskGIT: the reference's count schedule, CFG ramp and Gumbel noise); see SamplerConfig.with_defaults.
    sampler: dict = field(default_factory=dict)


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # (B, h, w) int64 on CPU
    images: np.ndarray | None  # (B, H, W, 3) uint8, or None when only tokens were asked for
    nfe: int  # transformer calls per generation
    seconds: float  # wall time of the whole batch


@dataclass
class MGTPipeline:
    """A loaded model: transformer, VQ decoder, conditioner (text encoder, for Meissonic and aMUSEd) and defaults.

    ``family`` is the name of the model's family (``meissonic``, ``amused``, ``maskgit``;
    :mod:`mgt.models.families`).
    """

    family: str
    transformer: torch.nn.Module
    vqvae: VQModel
    conditioner: Conditioner
    defaults: ModelDefaults
    mask_token_id: int
    name: str = ""
    # Samples per transformer forward (each with its CFG pair); None = the whole batch in one forward.
    micro_batch: int | None = 1

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vqvae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this (VQ scale x 2 when the transformer down-samples)."""
        return self.vae_scale_factor * self.transformer.token_grid_multiple

    def check_size(self, width: int, height: int) -> None:
        """Raise a ValueError naming the nearest valid sizes when ``width``/``height`` do not fit the model."""
        step = self.size_multiple
        for axis, value in (("width", width), ("height", height)):
            if value < step or value % step:
                lower = max(step, value // step * step)
                upper = lower + step if value > lower else lower
                raise ValueError(
                    f"{axis} {value} is not a multiple of {step} (VQ scale {self.vae_scale_factor}"
                    f"{' x 2 for the down-sampling transformer' if step != self.vae_scale_factor else ''}); "
                    f"nearest valid: {lower} or {upper}"
                )

    def make_generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        """One generator per sample, on the model's device (CPU generators reproduce diffusers exactly)."""
        return [torch.Generator(device=self.device).manual_seed(int(seed)) for seed in seeds]

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        negative_prompts: Sequence[str] | str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
        sampler: SamplerConfig | None = None,
        decode: bool = True,
        on_step: Callable[[int], None] | None = None,
        edits: Sequence[Edit | None] | None = None,
    ) -> GenerationOutput:
        """Generate one image per (prompt, seed), or edit the init image of the samples that have one.

        Args:
            prompts: B prompts; an empty string is an unconditional sample.
            seeds: B seeds, one generator each: a sample depends only on (prompt, seed, settings).
            negative_prompts: one per prompt, one for all, or None for the family default.
            steps, guidance, width, height: None means the model's defaults. CFG runs when guidance > 1.
            sampler: the sampling configuration; None is vanilla. Fields it leaves at the engine's defaults take
                the family's (``defaults.sampler``: MaskGIT samples as its reference).
            decode: False returns tokens only.
            on_step: called with the step index after each step (progress bars); once per step of each
                group of samples that start at the same step.
            edits: one per prompt, None for a plain generation (see :mod:`mgt.editing`): img2img, inpainting
                or outpainting. Their images set the default width and height and must all have that size.
                Samples run in groups of equal start step; ``nfe`` is then that of the longest group.
        """
        started = time.perf_counter()
        d = self.defaults
        steps = d.steps if steps is None else int(steps)
        guidance = d.guidance if guidance is None else float(guidance)
        edits = [None] * len(prompts) if edits is None else list(edits)
        first_edit = next((e for e in edits if e is not None), None)
        width = (first_edit.image.width if first_edit else d.width) if width is None else int(width)
        height = (first_edit.image.height if first_edit else d.height) if height is None else int(height)
        sampler = (sampler or SamplerConfig()).with_defaults(d.sampler)
        family = get_family(self.family)
        family.check_prompts(prompts, negative_prompts if isinstance(negative_prompts, str) else
                             next((n for n in negative_prompts or () if n), None))
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        if not prompts:
            raise ValueError("nothing to generate: the prompt list is empty")
        if len(edits) != len(prompts):
            raise ValueError(f"got {len(edits)} edits for {len(prompts)} prompts; give one per prompt (None: none)")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        try:
            self.check_size(width, height)
        except ValueError as error:
            if first_edit is None or first_edit.image.size != (width, height):
                raise
            raise ValueError(f"{first_edit.name} is {width}x{height}: {error}; resize or crop it") from None
        for edit in edits:
            if edit is not None:
                edit.check(width, height)
        negatives = _negatives(negative_prompts, d.negative_prompt, len(prompts))
        if sampler.cache is not None:
            check_cached_context(self)

        dtype, device = self.transformer.dtype, self.device
        positive = self.conditioner.condition(list(prompts), width, height, dtype, device)
        negative = self.conditioner.condition(negatives, width, height, dtype, device) if guidance > 1.0 else None

        batch = len(prompts)
        scale = self.vae_scale_factor
        grid = (height // scale, width // scale)
        generators = self.make_generators(seeds)
        init, start_steps, start_ratio = self.initial_tokens(edits, grid, steps, sampler, generators)
        tokens = torch.empty((batch, *grid), dtype=torch.long)
        nfe = 0
        for start in sorted(set(start_steps)):  # one loop per start step; the usual case is a single group
            members = torch.tensor([b for b in range(batch) if start_steps[b] == start])
            predict = partial(self.guided_logits, positive, negative, members)
            result = sampling.sample(predict, (len(members), *grid), steps,
                                     [generators[b] for b in members], self.mask_token_id, sampler,
                                     guidance=guidance, device=self.device, on_step=on_step, init=init[members],
                                     start_step=start, start_ratio=start_ratio[members],
                                     cache_patch=self.transformer.token_grid_multiple)
            tokens[members] = result.tokens.cpu()
            nfe = max(nfe, result.nfe)
        images = self.decode(tokens) if decode else None
        return GenerationOutput(tokens, images, nfe, time.perf_counter() - started)

    def initial_tokens(
        self,
        edits: Sequence[Edit | None],
        grid: tuple[int, int],
        steps: int,
        sampler: SamplerConfig,
        generators: Sequence[torch.Generator],
    ) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """Where each sample's loop starts: `(B, h, w)` tokens, start steps and `(B,)` mask-schedule scales.

        A plain generation starts fully masked at step 0 with scale 1. An edit starts from its image's tokens
        with the positions to redraw masked (:func:`mgt.editing.initial_tokens`, which may draw from the
        sample's generator before the loop, as the reference does); an inpainting mask scales the schedule by
        its share of the grid (``starting_mask_ratio``).
        """
        init = torch.full((len(edits), *grid), self.mask_token_id, dtype=torch.long)
        start_steps, start_ratio = [0] * len(edits), torch.ones(len(edits))
        rows = [b for b, edit in enumerate(edits) if edit is not None]
        if not rows:
            return init, start_steps, start_ratio
        schedule = schedules.get_schedule(sampler.mask_schedule, sampler.mask_schedule_power)
        encoded = editing.image_tokens(self.vqvae, [edits[b].image for b in rows], get_family(self.family)).cpu()
        for b, image_tokens in zip(rows, encoded):
            edit = edits[b]
            start_steps[b] = edit.start_step(steps)
            mask = None if edit.mask is None else editing.mask_grid(edit.mask, *grid)
            init[b] = editing.initial_tokens(image_tokens, mask, start_steps[b], steps, schedule, generators[b],
                                             self.mask_token_id)
            if mask is not None:
                start_ratio[b] = mask.sum() / mask.numel()
        return init, start_steps, start_ratio

    def guided_logits(self, positive: tuple[torch.Tensor, ...], negative: tuple[torch.Tensor, ...] | None,
                      members: torch.Tensor, tokens: torch.Tensor, step_value: int, scale: float,
                      context: ContextRequest | None = None) -> torch.Tensor:
        """The logits of the samples ``members`` (rows of the batch) at tokens ``(len(members), h, w)``, as
        :data:`mgt.sampling.loop.Predictor` returns them: classifier-free guided with ``scale`` when ``negative``
        (the negative prompts' conditioning) is given, token-major, float32.

        One forward per micro-batch: a matmul over other row counts may take another kernel, so running each
        sample's CFG pair alone keeps its logits, hence its tokens, independent of its batch-mates.

        ``context`` (cached-context steps, :mod:`mgt.sampling.cached_context`) routes every micro-batch through
        the family's cached forward (:func:`mgt.efficient.recap_sampling.cached_guided_logits`).
        """
        timestep = torch.tensor([step_value], dtype=torch.long, device=self.device)
        if context is not None:
            return cached_guided_logits(self, positive, negative, members, tokens, timestep, scale, context)
        outputs = []
        for rows in self.micro_batches(len(members)):
            picked = members[rows]
            if negative is None:
                logits = self.transformer(tokens[rows], *(c[picked] for c in positive), timestep)
                outputs.append(sampling.to_token_major(logits))
            else:
                conditioning = (torch.cat([n[picked], p[picked]]) for n, p in zip(negative, positive))
                logits = self.transformer(torch.cat([tokens[rows], tokens[rows]]), *conditioning, timestep)
                outputs.append(sampling.apply_guidance(logits, scale))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def micro_batches(self, batch: int) -> list[slice]:
        """The row slices of a batch of ``batch`` samples that run together (``micro_batch`` rows each)."""
        step = self.micro_batch or batch
        return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> np.ndarray:
        """VQ-decode `(B, h, w)` token ids to `(B, H, W, 3)` uint8 images (fp16 VQ upcast, as diffusers), from
        the family's pixel range (Meissonic and aMUSEd decode to [0, 1], MaskGIT's VQGAN to [-1, 1]).

        Decodes ``micro_batch`` images per call, as the transformer runs: convolutions over another batch
        size may take another kernel and move a pixel by one level, so an image would depend on its batch.
        """
        vq = self.vqvae
        if vq.dtype == torch.float16 and vq.config.force_upcast:
            vq = vq.float()
        batch, h, w = tokens.shape
        low, high = get_family(self.family).pixel_range
        pixels = torch.cat([
            vq.decode(tokens[rows].to(vq.device), force_not_quantize=True,
                      shape=(rows.stop - rows.start, h, w, vq.config.latent_channels)).sample.clip(low, high)
            for rows in self.micro_batches(batch)])
        pixels = (pixels - low) / (high - low)  # exact for (0, 1)
        return (pixels.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)


def _negatives(negative_prompts: Sequence[str] | str | None, default: str, count: int) -> list[str]:
    if negative_prompts is None:
        return [default] * count
    if isinstance(negative_prompts, str):
        return [negative_prompts] * count
    if len(negative_prompts) != count:
        raise ValueError(f"got {len(negative_prompts)} negative prompts for {count} prompts")
    return [default if n is None else n for n in negative_prompts]


def load_transformer(
    path_or_id: str,
    dtype: str | torch.dtype | None = "fp32",
    device: str | torch.device | None = "cpu",
    variant: str | None = None,
    cache_dir: str | None = None,
    quant: str | None = None,
    tome: float = 0.0,
    tome_reuse: int = 5,
) -> torch.nn.Module:
    """The transformer of a model: ``forward(token_ids, *conditioning, timestep) -> logits (B, codebook, H, W)``,
    the conditioning of Meissonic and aMUSEd being ``encoder_hidden_states, pooled_projections, micro_conds``.

    ``quant``, ``tome`` and ``tome_reuse`` as in :func:`load_pipeline`."""
    if efficient.needs_pipeline(quant):  # A8 presets calibrate on the whole model's own generations
        return load_pipeline(path_or_id, dtype, device, variant, cache_dir, quant, tome, tome_reuse).transformer
    model_dir = loading.resolve_model_path(path_or_id, cache_dir, variant)
    transformer = efficient.load_transformer(detect_family(model_dir).transformer, model_dir,
                                             loading.resolve_dtype(dtype), loading.resolve_device(device), variant,
                                             quant, cache_dir)
    return efficient.apply_tome(transformer, tome, tome_reuse)


def load_pipeline(
    path_or_id: str,
    dtype: str | torch.dtype | None = "fp32",
    device: str | torch.device | None = "auto",
    variant: str | None = None,
    cache_dir: str | None = None,
    quant: str | None = None,
    tome: float = 0.0,
    tome_reuse: int = 5,
    micro_batch: int | None = 1,
    compile: bool = False,
) -> MGTPipeline:
    """Load a whole model (registered name, local folder, ``s3://``/``gs://`` URI or hub id).

    ``dtype`` applies to the transformer and text encoder; the VQ decoder stays in fp32 unless fp16/bf16
    is asked for, in which case diffusers' ``force_upcast`` rule still decodes fp16 in fp32.
    ``quant``: None, a preset (w8a16, w4a16, w8a8, w4a8, scq; quantized here) or the path/URI of a
    ``maskray quantize`` checkpoint (its transformer replaces the model's, never loaded in full precision).
    ``tome``: TomeMGT merge ratio rho in the dual-stream blocks (0 = off), one plan per ``tome_reuse`` blocks.
    ``micro_batch``: samples per transformer forward (1: every image is bit-identical alone or in a batch;
    None: the whole batch in one forward, faster on large GPUs).
    ``compile``: ``torch.compile`` the transformer's repeated blocks once quantization and TomeMGT are
    applied (:func:`mgt.efficient.options.apply_compile`; not with ``quant``). Compilation happens in the first
    ``generate`` of each input shape.
    """
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1 or None, got {micro_batch}")
    check_compile(compile, quant)
    model_dir = loading.resolve_model_path(path_or_id, cache_dir, variant)
    family = detect_family(model_dir)
    torch_dtype, torch_device = loading.resolve_dtype(dtype), loading.resolve_device(device)
    for sub in ("transformer", "vqvae", *family.subfolders):
        if not (model_dir / sub).is_dir():
            raise loading.ModelLoadError(f"missing subfolder {model_dir / sub}; a {family.name} model folder needs "
                                         f"{', '.join(s + '/' for s in ('transformer', 'vqvae', *family.subfolders))}")
    transformer = efficient.load_transformer(family.transformer, model_dir, torch_dtype, torch_device, variant, quant,
                                             cache_dir)
    vqvae = loading.load_component(VQModel, model_dir / "vqvae", torch_dtype, torch_device, variant)
    mask_token_id = _mask_token_id(model_dir, transformer)
    defaults, settings = _defaults(model_dir, family, transformer, vqvae)
    try:  # a _maskray_defaults key that neither ModelDefaults nor the family's conditioner takes
        inspect.signature(family.load_conditioner).bind(model_dir, torch_dtype, torch_device, variant, **settings)
    except TypeError as error:
        raise loading.ModelLoadError(f"{model_dir / 'model_index.json'}: _maskray_defaults has "
                                     f"{', '.join(sorted(settings))}, which a {family.name} model does not take "
                                     f"({error}); remove them") from None
    conditioner = family.load_conditioner(model_dir, torch_dtype, torch_device, variant, **settings)
    pipe = MGTPipeline(family.name, transformer, vqvae, conditioner, defaults, mask_token_id, name=str(path_or_id),
                       micro_batch=micro_batch)
    efficient.calibrate_pipeline(pipe, quant)
    efficient.apply_tome(pipe.transformer, tome, tome_reuse)
    if compile:
        efficient.apply_compile(pipe.transformer)
    return pipe


def _mask_token_id(model_dir: Path, transformer: torch.nn.Module) -> int:
    path = model_dir / "scheduler" / "scheduler_config.json"
    if path.is_file():
        with open(path) as f:
            mask_id = json.load(f).get("mask_token_id", transformer.mask_token_id)
        if mask_id != transformer.mask_token_id:
            raise loading.ModelLoadError(f"{path} says mask_token_id={mask_id} but the transformer's vocab_size-1 "
                                         f"is {transformer.mask_token_id}")
    return transformer.mask_token_id


def _defaults(model_dir: Path, family: ModelFamily, transformer, vqvae: VQModel) -> tuple[ModelDefaults, dict]:
    """The family's defaults with ``model_index.json``'s ``_maskray_defaults`` over them, and the keys of
    ``_maskray_defaults`` that are no :class:`ModelDefaults` field (the conditioner's settings)."""
    values = family.defaults(transformer, 2 ** (len(vqvae.config.block_out_channels) - 1))
    index = model_dir / "model_index.json"
    overrides = json.loads(index.read_text()).get("_maskray_defaults", {}) if index.is_file() else {}
    names = {field.name for field in fields(ModelDefaults)}
    values.update({k: v for k, v in overrides.items() if k in names})
    return ModelDefaults(**values), {k: v for k, v in overrides.items() if k not in names}
