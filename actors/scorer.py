"""Picking an image scorer by name: the ``Scorer`` contract, its typed config and the registry.

A scorer maps (image, prompt) pairs to one float each, higher meaning a better match. The CLI and
YAML choose one by name through ``ScorerConfig``; ``build_scorer`` imports the heavy module only when
the scorer is built, so importing this module loads neither torch nor open_clip.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from PIL import Image


class Scorer(Protocol):
    """What every scorer offers: one float per (image, prompt) pair, in input order."""

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]: ...


# ---------------------------------------------------------------------------------------------------
# registry

_BUILDERS: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str, builder: Callable[..., Scorer]) -> None:
    """Make ``build_scorer(name, **options)`` call ``builder(**options)``.

    Raises:
        ValueError: ``name`` is already registered (two scorers under one name would make the
            choice depend on import order).
    """
    if name in _BUILDERS:
        raise ValueError(f"scorer {name!r} is already registered")
    _BUILDERS[name] = builder


def scorer_names() -> list[str]:
    """The registered scorer names, sorted."""
    return sorted(_BUILDERS)


def build_scorer(name: str, **options: Any) -> Scorer:
    """Build the scorer registered as ``name``, passing ``options`` to its constructor.

    Example: ``build_scorer("hps-v2.1", checkpoint="/ckpt/HPS_v2.1_compressed.pt", batch_size=16)``.

    Raises:
        ValueError: ``name`` is not registered; the message lists the known names.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(scorer_names())}")
    return _BUILDERS[name](**options)


def _build_hps(version: str, **options: Any) -> Scorer:
    from actors.hps import HPSv2Scorer

    return HPSv2Scorer(version=version, **options)


def _build_clip(**options: Any) -> Scorer:
    from actors.clip_score import CLIPScorer

    return CLIPScorer(**options)


register_scorer("hps-v2", functools.partial(_build_hps, "v2"))
register_scorer("hps-v2.1", functools.partial(_build_hps, "v2.1"))
register_scorer("clip", _build_clip)


def _build_shapes(**options: Any) -> Scorer:
    from actors.shapes_scorer import ShapesScorer

    return ShapesScorer(**options)


register_scorer("shapes", _build_shapes)


# ---------------------------------------------------------------------------------------------------
# config


class ScorerConfig(BaseModel):
    """Which scorer rates the generated images, and how it is loaded."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(
        default="hps-v2.1",
        description="Registered scorer: hps-v2, hps-v2.1 (HPS v2 / v2.1 human preference score) or clip "
        "(CLIPScore).",
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
        if name not in _BUILDERS:
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


# ---------------------------------------------------------------------------------------------------
# helpers shared by the scorers

def check_pairs(images: Sequence[Any], prompts: Sequence[Any]) -> None:
    """Reject inputs that are not one PIL image per prompt string.

    Raises:
        ValueError: the two lists differ in length.
        TypeError: an element is not a ``PIL.Image.Image`` or not a ``str``.
    """
    from PIL import Image

    if len(images) != len(prompts):
        raise ValueError(f"score() needs one prompt per image; got {len(images)} images and {len(prompts)} prompts")
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{index}] is a {type(image).__name__}, expected a PIL.Image.Image")
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{index}] is a {type(prompt).__name__}, expected a str")


def chunks(count: int, batch_size: int | None) -> list[slice]:
    """Slices covering ``range(count)`` in pieces of ``batch_size`` (one piece when it is ``None``)."""
    step = batch_size or max(count, 1)
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def score_in_chunks(images: Sequence[Any], prompts: Sequence[Any], batch_size: int | None,
                    score_batch: Callable[[Sequence[Any], Sequence[Any]], list[float]]) -> list[float]:
    """Check the (image, prompt) pairs, then score them ``batch_size`` at a time, in input order."""
    check_pairs(images, prompts)
    scores: list[float] = []
    for part in chunks(len(images), batch_size):
        scores.extend(score_batch(images[part], prompts[part]))
    return scores
