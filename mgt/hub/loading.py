"""Finding and loading MGT checkpoints: registered names, local folders, hub ids and object-store URIs.

A model is a folder in the diffusers hub layout (``transformer/ vqvae/ text_encoder/ tokenizer/
scheduler/``, as ``MeissonFlow/Meissonic``, ``Collov-Labs/Monetico`` and ``amused/amused-512`` ship).
Weights are built on the meta device and filled from safetensors, so loading never allocates a
randomly initialised copy, and any mismatch between config and weights is reported in one error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mgt.hub.checkpoints import COMPLETE, cache_dir, fetch_hub, fetch_prefix, staged, state_dict_mismatch
from mgt.hub.devices import resolve_device, resolve_dtype  # noqa: F401  (loading.resolve_* as before)
from mgt.hub.registry import Registry

OBJECT_STORE_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "memory://")
HUB_PATTERNS = ["*.json", "tokenizer/*", "*.txt"]
SUBFOLDERS = ("transformer", "vqvae", "text_encoder", "tokenizer")


class ModelLoadError(ValueError):
    """A model could not be found or does not match its config; the message names the path and the fix."""


# Registered names: a folder that ships inside a package (``os.PathLike``), or a function ``build(folder)``
# that writes the model into ``folder``, run once into the local cache. Other packages add names through the
# ``maskray.models`` entry-point group (see ``mgt.hub.registry``).
MODELS = Registry("model", "maskray.models", {
    "tiny-meissonic": "mgt.models.tiny:build_tiny_meissonic",
    "tiny-monetico": "mgt.models.tiny:build_tiny_monetico",
    "tiny-amused": "mgt.models.tiny:build_tiny_amused",
    "tiny-maskgit": "mgt.models.tiny:build_tiny_maskgit",
    "maskgit-256": "mgt.models.maskgit:build_maskgit_256",  # downloads llvictorll/Maskgit-pytorch
    "maskgit-512": "mgt.models.maskgit:build_maskgit_512",
})


def registered_models() -> list[str]:
    return MODELS.names()


def resolve_model_path(
    path_or_id: str | os.PathLike,
    cache: str | os.PathLike | None = None,
    variant: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """A local folder holding the model named by ``path_or_id``.

    Order: a registered name (a folder shipped in its package, or built once into the cache), an existing
    local folder, an object-store URI (downloaded once into the cache), then a hub id
    (``huggingface_hub.snapshot_download``, which honours ``HF_HUB_OFFLINE``).
    """
    spec = str(path_or_id)
    root = cache_dir(cache)
    if spec in MODELS:
        return _registered_folder(spec, root / "models" / spec)
    local = Path(spec).expanduser()
    if local.is_dir():
        return local
    if spec.startswith(OBJECT_STORE_SCHEMES):
        return _download_object_store(spec, root / "objects", storage_options or {})
    if _is_path(spec) or not _is_hub_id(spec):
        raise _not_a_model(spec)
    return _download_hub(spec, root / "hub", variant)


def check_model_name(spec: str) -> None:
    """Raise ``ModelLoadError`` for a model that can be nothing: not registered, not a path, not an object-store
    URI, not a hub id (owner/name). Run before a job starts; a path is not checked here, since on a cluster the
    folder may exist on the workers only (``resolve_model_path`` checks it where the model loads)."""
    if spec not in MODELS and not spec.startswith(OBJECT_STORE_SCHEMES) and not _is_path(spec) \
            and not _is_hub_id(spec) and not Path(spec).is_dir():
        raise _not_a_model(spec)


def _is_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~"))


def _is_hub_id(spec: str) -> bool:
    return not _is_path(spec) and spec.count("/") == 1


def _not_a_model(spec: str) -> ModelLoadError:
    return ModelLoadError(f"model {spec!r} is not a local folder, not an object-store URI and not a hub id "
                          f"(owner/name); registered names: {', '.join(registered_models())}")


def _registered_folder(name: str, folder: Path) -> Path:
    """The folder of registered model ``name``: its shipped folder, or ``folder`` once its builder wrote it."""
    model = MODELS.get(name)
    if isinstance(model, os.PathLike):
        return Path(model)
    if not callable(model):
        raise ModelLoadError(f"registered model {name!r} is a {type(model).__name__}; a registered model is a "
                             "folder (pathlib.Path) or a function build(folder) that writes the model into folder")
    if not (folder / COMPLETE).exists():  # built into a private folder, renamed into place once complete
        folder.parent.mkdir(parents=True, exist_ok=True)
        with staged(folder) as staging:
            model(staging)
            (staging / COMPLETE).touch()
    return folder


def _download_object_store(uri: str, root: Path, storage_options: dict[str, Any]) -> Path:
    try:
        return fetch_prefix(uri, root, storage_options, what="model URI")
    except (FileNotFoundError, ValueError) as error:  # missing, or a key that would leave the cache folder
        raise ModelLoadError(str(error)) from None


def _download_hub(repo_id: str, root: Path, variant: str | None) -> Path:
    suffix = f".{variant}" if variant else ""
    patterns = HUB_PATTERNS + [f"*/diffusion_pytorch_model{suffix}.safetensors*", f"*/model{suffix}.safetensors*",
                               f"*/diffusion_pytorch_model{suffix}-*.safetensors", f"*/model{suffix}-*.safetensors"]
    try:
        return fetch_hub(repo_id, root, allow_patterns=patterns, what=f"model {repo_id!r}")
    except FileNotFoundError as error:
        raise ModelLoadError(f"{error}; or pass a registered name: {', '.join(registered_models())}") from error


def read_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of a component folder, without the private ``_`` keys."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"missing {path}: a model folder needs {'/, '.join(SUBFOLDERS)}/ with their configs")
    with open(path) as f:
        config = json.load(f)
    return {k: v for k, v in config.items() if not k.startswith("_")}


def weight_files(folder: Path, stem: str, variant: str | None) -> list[Path]:
    """The safetensors file(s) of a component: single file or shards listed in an index."""
    suffix = f".{variant}" if variant else ""
    single = folder / f"{stem}{suffix}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{stem}{suffix}.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [folder / shard for shard in shards]
    available = sorted(p.name for p in folder.glob("*.safetensors"))
    raise ModelLoadError(
        f"no weights {single.name} in {folder} (found: {available or 'none'})"
        + ("; drop variant=" + repr(variant) if variant and available else "")
    )


def load_component(cls: type, folder: Path, dtype: torch.dtype, device: torch.device,
                   variant: str | None = None, stem: str = "diffusion_pytorch_model") -> torch.nn.Module:
    """Build ``cls.from_config`` on the meta device and fill it from the folder's safetensors strictly."""
    config = read_config(folder)
    try:
        with torch.device("meta"):
            module = cls.from_config(config)
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"{folder / 'config.json'} does not describe a {cls.__name__}: {error}") from error
    state = {}
    for file in weight_files(folder, stem, variant):
        state.update(load_file(file, device=str(device)))
    check_state_dict(module, state, folder)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(device=device).eval().requires_grad_(False)


def check_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Raise one :class:`ModelLoadError` listing missing, unexpected and mis-shaped tensors."""
    mismatch = state_dict_mismatch(module, state)
    if mismatch:
        raise ModelLoadError(f"weights in {folder} do not match {folder / 'config.json'}: {mismatch}")
