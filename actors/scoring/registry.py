"""Picking an image scorer by name: the registry of scorer builders and the typed ``ScorerConfig``.

The CLI and YAML choose a scorer by name through ``ScorerConfig``; ``build_scorer`` calls the builder
registered under that name. Built-in scorers are named here by ``"module:function"`` and imported only
when built, so importing this module loads neither torch nor open_clip. Other packages add scorers
through the ``maskray.scorers`` entry-point group (name = a function ``build(**options) -> Scorer``; see
``mgt.hub.registry``), which every process reads from the installed metadata, Ray workers included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.scoring.base import Scorer
from mgt.hub.registry import Registry

SCORERS = Registry("scorer", "maskray.scorers", {
    "hps-v2": "actors.scoring.hps:build_hps_v2",
    "hps-v2.1": "actors.scoring.hps:build_hps_v2_1",
    "clip": "actors.scoring.clip_score:CLIPScorer",
})


def register_scorer(name: str, builder: Callable[..., Scorer]) -> None:
    """Make ``build_scorer(name, **options)`` call ``builder(**options)`` in this process.

    Raises:
        ValueError: ``name`` is already registered (two scorers under one name would make the
            choice depend on import order).
    """
    SCORERS.register(name, builder)


def scorer_names() -> list[str]:
    """The registered scorer names, sorted."""
    return SCORERS.names()


def build_scorer(name: str, **options: Any) -> Scorer:
    """Build the scorer registered as ``name``, passing ``options`` to its constructor.

    Example: ``build_scorer("hps-v2.1", checkpoint="/ckpt/HPS_v2.1_compressed.pt", batch_size=16)``.

    Raises:
        ValueError: ``name`` is not registered; the message lists the known names.
        mgt.hub.registry.PluginError: the scorer's plugin fails to import.
    """
    return SCORERS.get(name)(**options)


class ScorerConfig(BaseModel):
    """Which scorer rates the generated images, and how it is loaded."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(
        default="hps-v2.1",
        description="Registered scorer: hps-v2, hps-v2.1 (HPS v2 / v2.1 human preference score), clip "
        "(CLIPScore), or a scorer an installed plugin registers (entry-point group maskray.scorers).",
    )
    checkpoint: str | None = Field(
        default=None,
        description="HPS weights: a local .pt file, a hub id ('xswu/HPSv2' or 'hf://owner/repo/file.pt') or "
        "an object-store URI (s3://, gs://). Unset: the xswu/HPSv2 file of the chosen version. Not used by clip.",
    )
    model: str | None = Field(
        default=None,
        description="Architecture. HPS: an open_clip model name or a JSON file holding its config "
        "(unset: ViT-H-14). clip: a transformers hub id or local folder (unset: openai/clip-vit-large-patch14).",
    )
    device: str | None = Field(
        default=None, description="Torch device such as cpu, cuda or cuda:1. Unset: cuda if available, else cpu."
    )
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        default=None, description="Weight dtype. Unset: float16 on CUDA, float32 on CPU."
    )
    batch_size: int | None = Field(
        default=None, ge=1, description="Images per forward pass. Unset: each score() call is one forward pass."
    )

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        if name not in SCORERS:
            raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(scorer_names())}")
        return name

    @model_validator(mode="after")
    def _clip_takes_no_checkpoint(self) -> ScorerConfig:
        if self.name == "clip" and self.checkpoint is not None:
            raise ValueError(
                f"scorer 'clip' takes no checkpoint (got {self.checkpoint!r}); "
                "set model to a hub id or a local folder instead"
            )
        return self


def build_scorer_from_config(config: ScorerConfig) -> Scorer:
    """Build the scorer that ``config`` names; unset fields fall back to the scorer's own defaults."""
    options = config.model_dump(exclude={"name"}, exclude_none=True)
    return build_scorer(config.name, **options)
