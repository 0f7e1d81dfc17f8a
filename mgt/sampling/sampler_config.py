"""The typed sampler configuration shared by Python, YAML/JSON, the CLI and HTTP requests.

One :class:`SamplerConfig` composes the mask schedule, the CFG-scale schedule and the three enhanced-inference
techniques of arXiv 2411.10781 (noise regularization, differential sampling, masked Z-Sampling). A technique
is on when its section is set; every default equals the released code (docs/samplers.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from mgt.validation import describe_validation_error

TECHNIQUES = ("noise", "differential", "zsampling")
# Fields added after runs were recorded: hashed only away from their default (SamplerConfig.config_hash); those
# added after release 0.1.0 are also left out of a dump at their default, so run config hashes stay too.
DUMPED_WHEN_SET = ("order", "softmax_temperature", "gumbel_noise", "cache")
HASHED_WHEN_SET = ("token_temperature", *DUMPED_WHEN_SET)
PRESETS = ("vanilla", "noise", "differential", "zsampling", "zsampling+noise", "zsampling+differential",
           "noise+differential", "all", "recap")


class NoiseRegularizationConfig(BaseModel):
    """Gaussian noise sigma(u) * N(0, I) on the post-CFG logits before the softmax (docs/samplers.md §3)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    amplitude: float = Field(2.0, ge=0, description="A in sigma(u) = A * f(u); 0 draws no noise (= vanilla).")
    schedule: Literal["abs_cos", "cos_half", "linear", "one_minus_pow", "const"] = Field(
        "abs_cos", description="f(u) with u = i/(T-1) (0 at the first, fully masked step): abs_cos |cos(pi u)| "
        "(released code), cos_half cos(pi u / 2), linear 1 - u, one_minus_pow 1 - u**power, const 1.")
    power: float = Field(0.6, gt=0, description="Exponent of the one_minus_pow schedule; ignored by the others.")


class DifferentialSamplingConfig(BaseModel):
    """Resample the most stable positions from max(p - P_prev, floor), renormalised (docs/samplers.md §4)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratio: float = Field(0.75, ge=0, le=1, description="z: share of positions modified, those of smallest "
                         "KL(p || P_prev); 0 modifies none (= vanilla).")
    ratio_of: Literal["all", "masked"] = Field("all", description="z counts all N positions (released code: "
                                               "3072 of 4096) or only the still-masked ones.")
    floor: float = Field(1e-6, gt=0, description="Floor of p - P_prev before renormalising.")
    store_modified_prev: bool = Field(True, description="Keep the modified distribution as P_prev (released "
                                      "code) instead of the raw softmax.")


class MaskedZSamplingConfig(BaseModel):
    """Zigzag: forward step, inversion pass at weak guidance, re-mask, re-denoise (docs/samplers.md §5)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inversion_cfg: float = Field(0.0, description="CFG scale s_inv of the inversion pass; 0 keeps only the "
                                 "unconditional (negative-prompt) branch, 1 only the conditional one.")
    num_steps: int | None = Field(None, ge=0, description="lambda: zigzag on steps 0..lambda-1; unset means "
                                  "T-1 (every step but the last); at most T-1.")
    remask_rule: Literal["top_conf_all", "low_conf_all", "top_conf_new", "random"] = Field(
        "top_conf_all", description="Which tokens go back to [MASK]: highest / lowest inversion max-probability "
        "among all known tokens, highest among the tokens just revealed, or uniformly random known tokens.")
    remask_count: Literal["revealed-1", "revealed"] = Field(
        "revealed-1", description="How many: the forward step's revealed count minus 1 (released code), or all.")


class CachedContextConfig(BaseModel):
    """Cached-context steps (ReCAP, arXiv 2505.19089): full forwards interleaved with local ones that run only
    the positions being decoded against the keys and values cached at the last full one (docs/efficiency.md).

    Reference options (github.com/liebenxj/ReCAP @ 4d1da38, ``examples/MaskGIT+ReCAP/cache_decoding.py``):
    ``--pre_full_iters`` is ``full_first``, ``--num_cache_iters`` is ``full_every - 1``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    full_every: int = Field(2, ge=1, description="k: after the first full_first steps, step i is full when "
                            "(i - full_first) % k == 0 and local otherwise (k - 1 local steps per full one; "
                            "ReCAP's num_cache_iters = k - 1); 1 runs every step full, as without the cache.")
    full_first: int = Field(0, ge=0, description="P: steps 0..P-1 all run full (ReCAP's pre_full_iters).")
    queries: Literal["group", "masked"] = Field(
        "group", description="What a local step computes. group (ReCAP's grouped decoding): the full step picks, "
        "by the re-masking confidence, the positions revealed before the next full step; local steps compute and "
        "draw those only, the other masked positions stay masked. masked: every position masked at the last full "
        "step is recomputed and re-drawn, as the vanilla sampler does (cheaper only late in the schedule).")


RECAP_PRESET = {"full_every": 3, "full_first": 0, "queries": "group"}  # the schedule docs/efficiency.md chose


class SamplerConfig(BaseModel):
    """How the masked tokens are drawn and re-masked at each step; vanilla = diffusers' AmusedScheduler.

    Written as a mapping (Python, YAML, JSON, HTTP) with the fields below, e.g.
    ``{"noise": {"amplitude": 1.5}, "zsampling": {}}``, or ``{"preset": "zsampling+noise", ...overrides}``.
    On the command line: ``PRESET`` or ``PRESET:key=value,key=value``, where PRESET is ``vanilla``, ``all``
    or ``+``-joined techniques (``noise``, ``differential``, ``zsampling``, in any order), keys are dotted
    field paths and values are JSON (bare words are strings), e.g.
    ``zsampling+noise:noise.amplitude=1.5,zsampling.inversion_cfg=0.5`` or
    ``vanilla:mask_schedule=arccos,gumbel_temperature=[3,0]`` or ``vanilla:order=halton``. Naming a field of a
    technique turns it on; ``noise=null`` turns it off.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mask_schedule: Literal["cosine", "linear", "arccos", "power", "arccos_maskgit"] = Field(
        "cosine", description="Fraction of tokens still masked after each step, as a function of progress; "
        "arccos_maskgit reveals MaskGIT v1.0's counts round(v_i / sum(v) * N) of v = arccos(linspace(1, 0, T)) "
        "(at least 1, the remainder at the last step) instead of clipping an arccos ratio."
    )
    mask_schedule_power: float = Field(
        2.0, gt=0, description="Exponent p of the 'power' mask schedule (1 - r**p); ignored by the others."
    )
    gumbel_temperature: tuple[float, float] = Field(
        (2.0, 0.0),
        description="Start and end of the Gumbel-noise temperature on the re-masking confidence, annealed "
        "linearly over the steps (Meissonic/aMUSEd: 2 -> 0).",
    )
    gumbel_noise: Literal["torch", "numpy"] = Field(
        "torch", description="Source of the Gumbel noise: torch, from each sample's generator (diffusers), or "
        "numpy, float64 np.random.RandomState(the generator's seed).gumbel as the MaskGIT reference draws it.")
    softmax_temperature: float = Field(
        1.0, gt=0, description="Multiplies the guided logits before the softmax, for the draw and the confidence "
        "alike (MaskGIT's sm_temp); 1 leaves them as they are.")
    token_temperature: float = Field(
        1.0, ge=0, description="Temperature tau of the token draw: tokens are drawn from p**(1/tau) renormalised, "
        "so 1 is the reference's multinomial and 0 the argmax; the re-masking confidence keeps log p of the "
        "untempered distribution (docs/samplers.md §2).")
    order: Literal["confidence", "halton"] = Field(
        "confidence", description="Which drawn tokens stay revealed at each step: those of highest confidence "
        "(log p + Gumbel, the reference samplers), or the first cells of the token grid's 2-D Halton sequence "
        "(arXiv 2503.17076), rolled by a random offset per sample, so each step's new tokens spread evenly over "
        "the image; the Gumbel temperature is then unused.")
    guidance_schedule: Literal["constant", "linear"] = Field(
        "constant", description="CFG scale per step: constant s (Meissonic), or MaskGIT's linear ramp "
        "1 + (s - 1) * i/(T-1) from the plain conditional to s.")
    noise: NoiseRegularizationConfig | None = Field(None, description="Noise regularization; unset is off.")
    differential: DifferentialSamplingConfig | None = Field(None, description="Differential sampling; unset "
                                                             "is off.")
    zsampling: MaskedZSamplingConfig | None = Field(None, description="Masked Z-Sampling; unset is off.")
    cache: CachedContextConfig | None = Field(None, description="Cached-context steps (ReCAP); unset runs "
                                              "every step full. Z-Sampling's zigzag steps always run full.")

    @classmethod
    def from_spec(cls, spec: str | dict | SamplerConfig) -> SamplerConfig:
        """A config from a preset, a CLI spec (see the class docstring), a JSON object string or a mapping."""
        if isinstance(spec, SamplerConfig):
            return spec
        if isinstance(spec, dict):
            values = dict(spec)
            preset = values.pop("preset", "vanilla")
            return _validate(_merge(preset_values(preset), values), spec)
        text = spec.strip()
        if text.startswith("{"):
            return cls.from_spec(json.loads(text))
        preset, _, overrides = text.partition(":")
        values = preset_values(preset.strip() or "vanilla")
        for key, value in _parse_overrides(overrides, spec):
            _merge(values, _nest(key.split("."), value))
        return _validate(values, spec)

    @model_serializer(mode="wrap")
    def _leave_out_later_defaults(self, handler) -> dict[str, Any]:
        """The fields, minus those of :data:`DUMPED_WHEN_SET` at their default (a run's config hash covers the dump)."""
        values = handler(self)
        for name in DUMPED_WHEN_SET:
            if getattr(self, name) == type(self).model_fields[name].default:
                values.pop(name, None)
        return values

    @model_validator(mode="after")
    def _cache_needs_confidence_order(self) -> SamplerConfig:
        """Cached-context steps choose the next group of positions by confidence; the Halton order reveals cells in
        a fixed sequence instead, so the two do not compose."""
        if self.cache is not None and self.order == "halton":
            raise ValueError("cache (cached-context steps) picks the positions to decode by confidence and "
                             "order=halton by the Halton sequence; drop one of the two")
        return self

    def with_defaults(self, values: dict[str, Any]) -> SamplerConfig:
        """This config with ``values`` (a model family's sampler defaults) in the fields it leaves at the engine's
        default: MaskGIT samples as its reference unless a field says otherwise (which is why a field cannot be
        set back to the engine's default on such a family: name another value)."""
        fields = type(self).model_fields
        unset = {name: value for name, value in values.items() if getattr(self, name) == fields[name].default}
        return _validate({**self.model_dump(), **unset}, values) if unset else self

    def config_hash(self) -> str:
        """A short stable hash of every field: all of them change the pixels.

        A field added after runs were recorded (:data:`HASHED_WHEN_SET`) enters the hash only away from its
        default, so a run recorded before it existed keeps its hash and still resumes.
        """
        values = self.model_dump(mode="json")
        for name in HASHED_WHEN_SET:
            if name in values and values[name] == type(self).model_fields[name].default:
                del values[name]
        payload = json.dumps(values, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def preset_values(preset: str) -> dict[str, Any]:
    """The field mapping of a preset: ``vanilla``, ``all`` or ``+``-joined techniques in any order."""
    parts = [p.strip() for p in preset.split("+")]
    if preset == "recap":
        return {"cache": dict(RECAP_PRESET)}
    if preset == "all":
        parts = list(TECHNIQUES)
    elif preset == "vanilla":
        parts = []
    if any(p not in TECHNIQUES for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"unknown sampler preset {preset!r}; use one of {', '.join(PRESETS)} (techniques "
                         f"{', '.join(TECHNIQUES)} joined by '+' in any order), optionally followed by "
                         f"':key=value,...' overrides, or a mapping of SamplerConfig fields")
    return {part: {} for part in parts}


_KEY_START = re.compile(r",\s*(?=[A-Za-z_][\w.]*\s*=)")  # a comma that starts the next key=value


def _parse_overrides(text: str, spec: str) -> list[tuple[str, Any]]:
    pairs = []
    for item in filter(None, (s.strip() for s in _KEY_START.split(text))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"sampler spec {spec!r}: {item!r} is not key=value; write e.g. "
                             f"'zsampling+noise:noise.amplitude=1.5,zsampling.inversion_cfg=0.5'")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw.strip()
        pairs.append((key.strip(), value))
    return pairs


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    return {path[0]: value} if len(path) == 1 else {path[0]: _nest(path[1:], value)}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into ``base`` (in place) and return it; a mapping into None or {} enables it."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = dict(value) if isinstance(value, dict) else value
    return base


def _validate(values: dict[str, Any], spec: Any) -> SamplerConfig:
    try:
        return SamplerConfig.model_validate(values)
    except ValidationError as error:
        raise ValueError(f"invalid sampler {spec!r}: {describe_validation_error(error)}") from None
