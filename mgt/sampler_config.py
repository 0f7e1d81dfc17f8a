"""The typed sampler configuration shared by Python, YAML/JSON, the CLI and HTTP requests."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SamplerConfig(BaseModel):
    """How the masked tokens are drawn and re-masked at each step (vanilla = diffusers' AmusedScheduler)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mask_schedule: Literal["cosine", "linear", "arccos", "power"] = Field(
        "cosine", description="Fraction of tokens still masked after each step, as a function of progress."
    )
    mask_schedule_power: float = Field(
        2.0, gt=0, description="Exponent p of the 'power' mask schedule (1 - r**p); ignored by the others."
    )
    gumbel_temperature: tuple[float, float] = Field(
        (2.0, 0.0),
        description="Start and end of the Gumbel-noise temperature on the re-masking confidence, annealed "
        "linearly over the steps (Meissonic/aMUSEd: 2 -> 0).",
    )

    @classmethod
    def from_spec(cls, spec: "str | dict | SamplerConfig") -> "SamplerConfig":
        """A config from a preset name (``vanilla``), a JSON object string, a mapping, or a config."""
        if isinstance(spec, SamplerConfig):
            return spec
        if isinstance(spec, dict):
            return cls.model_validate(spec)
        text = spec.strip()
        if text in ("", "vanilla"):
            return cls()
        if text.startswith("{"):
            return cls.model_validate(json.loads(text))
        raise ValueError(f"unknown sampler {spec!r}; use a preset (vanilla) or a JSON object of SamplerConfig fields")

    def config_hash(self) -> str:
        """A short stable hash of every field: all of them change the pixels."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]
