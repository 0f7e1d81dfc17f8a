"""Quantized transformer checkpoints (arXiv 2411.10781 §4): saved once, loaded without the full-precision model.

A checkpoint is a folder (local path or fsspec URI such as ``s3://bucket/prefix``)::

    config.json                           the transformer's config (its constructor arguments)
    quantization_map.json                 optimum-quanto's map: module name -> {weights, activations}
    maskray_quantization.json             preset, family (its name in mgt.models.families), dtype, source
                                          model, calibration settings
    diffusion_pytorch_model.safetensors   int weights, their scales/shifts, activation scales, other tensors

Loading builds the transformer on the meta device, swaps each mapped Linear for its quantized
counterpart (still on meta), then assigns the safetensors tensors: the full-precision transformer is
never materialised, so an actor needs only the quantized weights' memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec
import torch
from optimum.quanto import quantization_map
from optimum.quanto.nn import QModuleMixin
from optimum.quanto.quantize import set_module_by_name
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from mgt.efficient.quant_config import PRESETS
from mgt.efficient.quantization import qlinear_class
from mgt.hub import loading
from mgt.models.families import family_of, get_family

CONFIG = "config.json"
QUANTIZATION_MAP = "quantization_map.json"
INFO = "maskray_quantization.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
ALIGNMENT = 64  # bytes


def save_quantized(transformer: torch.nn.Module, uri: str, *, preset: str, source_model: str,
                   settings: dict[str, Any] | None = None, storage_options: dict[str, Any] | None = None) -> str:
    """Write a frozen quantized transformer to ``uri`` (a folder path or fsspec URI); returns ``uri``.

    Args:
        transformer: a transformer quantized by :func:`mgt.efficient.quantization.quantize_transformer` and frozen.
        preset: the preset it was quantized with (recorded for provenance).
        source_model: the model it was quantized from (its text encoder, tokenizer and VQ are loaded
            from there when this checkpoint is used).
        settings: calibration settings to record, e.g. ``SCQConfig.model_dump()``.
    """
    family = family_of(transformer).name
    qmodules = [m for m in transformer.modules() if isinstance(m, QModuleMixin)]
    if not qmodules:
        raise ValueError("the transformer has no quantized layer; quantize it first (mgt.efficient.quantization)")
    if not all(m.frozen for m in qmodules):
        raise ValueError("the transformer is quantized but not frozen; call optimum.quanto.freeze(transformer) "
                         "so that integer weights are saved")
    state = {name: tensor.contiguous() for name, tensor in transformer.state_dict().items()}
    info = {"preset": preset, "family": family, "dtype": str(transformer.dtype).removeprefix("torch."),
            "source_model": source_model, "settings": settings or {}}
    fs, root = fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{WEIGHTS}", safetensors_bytes(state, metadata={"format": "pt"}))
    fs.pipe_file(f"{root}/{CONFIG}", json.dumps(json.loads(transformer.to_json_string()), indent=2).encode())
    fs.pipe_file(f"{root}/{QUANTIZATION_MAP}", json.dumps(quantization_map(transformer), indent=2).encode())
    fs.pipe_file(f"{root}/{INFO}", json.dumps(info, indent=2).encode())  # last: marks a complete checkpoint
    return str(uri)


def is_checkpoint(folder: Path) -> bool:
    return (folder / INFO).is_file()


def resolve_checkpoint(uri: str, cache: str | None = None) -> Path:
    """A local folder holding the checkpoint at ``uri`` (object-store URIs are downloaded once into the cache)."""
    local = Path(str(uri)).expanduser()
    if local.is_dir():
        folder = local
    elif str(uri).startswith(loading.OBJECT_STORE_SCHEMES):
        folder = loading.resolve_model_path(uri, cache)
    else:
        raise ValueError(f"quant {uri!r} is not a preset ({', '.join(PRESETS)}), a local folder or an object-store "
                         f"URI ({', '.join(loading.OBJECT_STORE_SCHEMES)}); write a checkpoint with `maskray quantize`")
    if not is_checkpoint(folder):
        raise loading.ModelLoadError(f"{uri} is not a quantized checkpoint: {INFO} is missing (an interrupted "
                                     "`maskray quantize`?); write it again")
    return folder


def read_info(folder: Path) -> dict[str, Any]:
    return json.loads((folder / INFO).read_text())


def load_quantized(uri: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                   cache: str | None = None, expected_config: dict[str, Any] | None = None) -> torch.nn.Module:
    """Build the quantized transformer saved at ``uri`` directly, without its full-precision weights.

    Args:
        dtype: float dtype of scales and non-quantized tensors; None keeps the checkpoint's.
        expected_config: the base model's transformer config; a differing shared key is an error.
    """
    folder = resolve_checkpoint(uri, cache)
    info = read_info(folder)
    config = loading.read_config(folder)
    if expected_config is not None:
        differing = sorted(k for k in set(config) & set(expected_config) if config[k] != expected_config[k])
        if differing:
            details = ", ".join(f"{k}: {config[k]!r} vs {expected_config[k]!r}" for k in differing[:5])
            raise loading.ModelLoadError(f"quantized checkpoint {uri} was made from {info['source_model']!r}, whose "
                                         f"transformer differs from the model given ({details}); pass "
                                         f"--model {info['source_model']}")
    cls = get_family(info["family"]).transformer
    with torch.device("meta"):
        model = cls.from_config(config)
    qmap = json.loads((folder / QUANTIZATION_MAP).read_text())
    for name, entry in qmap.items():
        module = model.get_submodule(name)
        qmodule = qlinear_class(entry["activations"]).qcreate(
            module, weights=None if entry["weights"] == "none" else entry["weights"],
            activations=None if entry["activations"] == "none" else entry["activations"], device="meta")
        qmodule.name = name
        set_module_by_name(model, name, qmodule)
    state = load_file(folder / WEIGHTS, device=str(loading.resolve_device(device)))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    # safetensors tensors sit at arbitrary offsets of the file buffer; quanto's CPU int8 kernel
    # (torch._weight_int8pack_mm, bf16) crashes on unaligned data, so unaligned tensors get their own copy.
    state = {k: v if v.data_ptr() % ALIGNMENT == 0 else v.clone() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise loading.ModelLoadError(f"{folder / WEIGHTS} lacks {', '.join(left[:5])}"
                                     f"{f' (+{len(left) - 5} more)' if len(left) > 5 else ''}; write it again")
    return model.eval().requires_grad_(False)
