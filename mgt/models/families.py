"""The table of model families: what the engine needs to know of each kind of masked generative transformer.

A family (:class:`ModelFamily`) is one module holding its transformer class and its row: the
``transformer/config.json`` ``_class_name`` its checkpoints carry, its default settings, how prompts become
its conditioning, and its tiny random transformer. Meissonic (with Monetico), aMUSEd and MaskGIT ship with maskray
(:mod:`mgt.models.meissonic`, :mod:`mgt.models.amused`, :mod:`mgt.models.maskgit`); another package adds a family with an entry point
in the ``maskray.families`` group, whose value is the module attribute holding its :class:`ModelFamily`::

    [project.entry-points."maskray.families"]
    maskgit = "my_package.maskgit:MASKGIT"

and registers its models under ``maskray.models`` as usual. The family's name is stored in quantized
checkpoints (``maskray_quantization.json``), so a family keeps its name once checkpoints exist.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mgt.hub.loading import ModelLoadError
from mgt.hub.registry import Registry

if TYPE_CHECKING:
    import torch


def any_prompt(prompts: Sequence[str], negative_prompt: str | None = None) -> None:
    """A text family takes any prompt and negative prompt."""


def vq_model_tokens(vqvae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """`(B, h, w)` codes of `(B, 3, H, W)` pixels by the diffusers ``VQModel``'s own encoder and quantizer."""
    latents = vqvae.encode(pixels).latents
    batch, _, rows, cols = latents.shape
    return vqvae.quantize(latents)[2][2].reshape(batch, rows, cols)


class Conditioner(Protocol):
    """How a family turns prompts into its transformer's conditioning (a text encoder, class labels, ...)."""

    def condition(self, prompts: Sequence[str], width: int, height: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, ...]:
        """The transformer's inputs between the token ids and the timestep, one row per prompt in each tensor.

        Floating inputs come in ``dtype``; every input is on ``device``. An empty prompt is unconditional.
        """


@dataclass(frozen=True)
class ModelFamily:
    """One kind of masked generative transformer, as the engine loads, runs, quantizes and fakes it.

    Attributes:
        name: the family's name, stored in quantized checkpoints (``meissonic``, ``amused``).
        transformer: the transformer class (a diffusers ``ModelMixin``/``ConfigMixin`` with ``mask_token_id``
            and ``token_grid_multiple``, see :mod:`mgt.models.token_grid`), called as
            ``transformer(token_ids, *conditioning, timestep) -> logits (B, codebook, h, w)``.
        class_names: the ``_class_name`` values of ``transformer/config.json`` this family loads; the first
            is the one its reference checkpoints carry (the tiny models write it). The class's own name is
            recognised too, as diffusers' ``save_pretrained`` writes it.
        defaults: ``(transformer, vq_scale) -> {steps, guidance, negative_prompt, width, height}``; a model
            folder's ``model_index.json`` ``_maskray_defaults`` overrides them.
        load_conditioner: ``(model_dir, dtype, device, variant, **settings) -> Conditioner``; ``settings`` are
            the other keys of ``_maskray_defaults`` (e.g. ``text_max_length``).
        subfolders: the folders a model of this family holds besides ``transformer/`` and ``vqvae/``.
        tiny_transformer: ``() -> transformer`` with a few thousand random weights, for tests and demos.
        model_index: the family's entries of ``model_index.json`` (its reference pipeline, scheduler and
            transformer class names), written by :func:`mgt.models.tiny.write_model`.
        pixel_range: the range of the VQ model's pixels, in and out: (0, 1) for Meissonic and aMUSEd, whose
            pipelines skip the [-1, 1] normalisation, (-1, 1) for taming VQGANs (MaskGIT).
        image_tokens: ``(vqvae, pixels (B, 3, H, W) in pixel_range) -> codes (B, h, w)``, for editing.
        check_prompts: ``(prompts, negative_prompt) -> None``, raising a ValueError for a prompt the family
            cannot condition on (run before a job starts: MaskGIT's prompts are ImageNet classes).
        cached_forward: the cached-context forward (ReCAP, :mod:`mgt.efficient.recap`), or None when the family
            has none (``SamplerConfig.cache`` is then refused).
    """

    name: str
    transformer: type
    class_names: tuple[str, ...]
    defaults: Callable[[Any, int], dict[str, Any]]
    load_conditioner: Callable[..., Conditioner]
    subfolders: tuple[str, ...]
    tiny_transformer: Callable[[], Any]
    model_index: Mapping[str, Any]
    pixel_range: tuple[float, float] = (0.0, 1.0)
    image_tokens: Callable[[Any, torch.Tensor], torch.Tensor] = field(default=vq_model_tokens)
    check_prompts: Callable[..., None] = field(default=any_prompt)
    cached_forward: Callable[..., Any] | None = None

    def recognises(self, class_name: str) -> bool:
        return class_name in self.class_names or class_name == self.transformer.__name__


FAMILIES = Registry("model family", "maskray.families", plural="model families", builtins={
    "meissonic": "mgt.models.meissonic:MEISSONIC",
    "amused": "mgt.models.amused:AMUSED",
    "maskgit": "mgt.models.maskgit:MASKGIT",
})


def get_family(name: str) -> ModelFamily:
    """The family registered as ``name`` (a ValueError lists the registered ones)."""
    family = FAMILIES.get(name)
    if not isinstance(family, ModelFamily) or family.name != name:
        raise ModelLoadError(f"the model family registered as {name!r} is {family!r}, not a ModelFamily named "
                             f"{name!r}; point its entry point at the ModelFamily of that name")
    return family


def families() -> list[ModelFamily]:
    return [get_family(name) for name in FAMILIES.names()]


def detect_family(model_dir: Path) -> ModelFamily:
    """The family of the model in ``model_dir``, from ``transformer/config.json``'s ``_class_name``."""
    path = model_dir / "transformer" / "config.json"
    if not path.is_file():
        raise ModelLoadError(
            f"missing {path}: {model_dir} is not in the hub layout (transformer/ vqvae/ and the family's folders)")
    with open(path) as f:
        class_name = json.load(f).get("_class_name")
    matches = [family for family in families() if family.recognises(class_name)]
    if len(matches) == 1:
        return matches[0]
    known = "; ".join(f"{family.name}: {', '.join(family.class_names)}" for family in families())
    if matches:
        raise ModelLoadError(f"{path}: _class_name {class_name!r} is claimed by the families "
                             f"{', '.join(f.name for f in matches)}; uninstall the package of one of them")
    if class_name is None:
        raise ModelLoadError(f"{path} has no _class_name; add the one of its family ({known})")
    raise ModelLoadError(f"{path}: _class_name {class_name!r} is no known model family's ({known}); install the "
                         "package that registers its family under the maskray.families entry points")


def model_family(spec: str) -> ModelFamily | None:
    """The family of model ``spec`` when the driver can tell without loading weights: a registered name (built or
    fetched once into the cache, as the workers would), a local folder, or a hub id (its
    ``transformer/config.json`` alone); None for an object-store URI or a model that cannot be reached here,
    which the workers then check where they load it."""
    from mgt.hub import loading
    from mgt.hub.checkpoints import fetch_hub

    try:
        if spec in loading.MODELS or Path(spec).expanduser().is_dir():
            return detect_family(loading.resolve_model_path(spec))
        if loading._is_hub_id(spec):
            config = fetch_hub(spec, None, filename="transformer/config.json", what=f"model {spec!r}")
            return detect_family(config.parent.parent)
    except (FileNotFoundError, ModelLoadError):
        return None
    return None


def family_of(transformer: object) -> ModelFamily:
    """The family whose transformer class is ``transformer``'s class or its nearest base class."""
    mro = type(transformer).__mro__
    matches = [family for family in families() if family.transformer in mro]
    if matches:
        return min(matches, key=lambda family: mro.index(family.transformer))
    raise ValueError(f"a {type(transformer).__name__} belongs to no model family; expected one of "
                     f"{', '.join(family.transformer.__name__ for family in families())}")
