"""HPS v2 / v2.1 (Human Preference Score, arXiv 2306.09341) as a batched scorer on ``open_clip``.

The ``hpsv2`` package is not a dependency (its 1.2.0 wheel lacks its tokenizer vocabulary, reloads the
checkpoint on every call, scores one image at a time and pins ``pytest==7.2.0`` and ``protobuf<4`` at run
time; docs/models.md): this module reproduces the scoring path of ``hpsv2.img_score.score`` (hpsv2 1.2.0)
on pip ``open_clip_torch``, checked against ``tests/fixtures/hps-tiny`` (every row, square or not, with the
default preprocessing). The score is the cosine similarity of the normalised image and text features: no
logit scale and no x100 (the benchmark's x100 scale is left to the caller).
"""

from __future__ import annotations

import difflib
import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import open_clip
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from open_clip.utils import to_2tuple
from torchvision.transforms import InterpolationMode

from actors.scoring.base import BatchedScorer
from mgt.hub import checkpoints
from mgt.hub.devices import resolve_device, resolve_dtype

if TYPE_CHECKING:
    from PIL import Image

HPS_HUB_REPO = "xswu/HPSv2"
# hpsv2.utils.hps_version_map, with "v2" for hpsv2's "v2.0".
HPS_HUB_FILES = {"v2": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
_BARE_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


# ---------------------------------------------------------------------------------------------------
# preprocessing (hpsv2 ``image_transform(..., is_train=False, resize_longest_max=True)``)


def preprocess(image: Image.Image, size: int, resize_mode: Literal["pad", "crop"] = "pad") -> torch.Tensor:
    """One image as the HPS model sees it, shape ``(3, size, size)``, OpenAI-normalised.

    ``"pad"`` is hpsv2's own eval transform (hpsv2 1.2.0 ``src/open_clip/transform.py``,
    ``ResizeMaxSize``; docs/models.md): ToTensor, bicubic resize of the longer side to ``size``
    (antialiased, torchvision's tensor default since 0.17), zero padding split evenly with the odd
    pixel right/bottom, then OpenAI mean/std. It gives hpsv2's pixels exactly, and the hps-tiny
    fixture's scores on every row. ``"crop"`` is open_clip's standard eval transform instead: bicubic
    resize of the shorter side, then a centre crop. Square images give the same pixels either way.

    Three reference quirks are fixed rather than kept, since hpsv2 crashes on them: RGBA is kept as
    4 channels there (its ``MaskAwareNormalize`` treats alpha as a training mask, and the 3-channel
    patch embedding then rejects it), a non-square image whose longer side already equals ``size``
    is left unpadded, and an extreme aspect ratio (1 x 300 at 32) rounds a side to zero pixels. Here
    alpha is dropped, keeping the colour channels that hpsv2 would have normalised, every image is
    padded to a square, and no side shrinks below one pixel.

    Args:
        image: Any PIL image; grayscale, palette and alpha modes are converted to RGB.
        size: Side of the square model input in pixels (224 for ViT-H-14).
        resize_mode: ``"pad"`` (hpsv2, default) or ``"crop"`` (open_clip's eval transform; see above).
    """
    pixels = TF.to_tensor(image.convert("RGB"))
    if resize_mode == "crop":
        pixels = TF.resize(pixels, size, InterpolationMode.BICUBIC, antialias=True)
        pixels = TF.center_crop(pixels, [size, size])
    else:
        height, width = pixels.shape[-2:]
        scale = size / max(height, width)
        if scale != 1.0:
            # max(1, ...) keeps extreme aspect ratios (e.g. 1x1000) from rounding a side to zero.
            new_size = [max(1, round(height * scale)), max(1, round(width * scale))]
            pixels = TF.resize(pixels, new_size, InterpolationMode.BICUBIC, antialias=True)
        pad_h, pad_w = size - pixels.shape[-2], size - pixels.shape[-1]
        pixels = TF.pad(pixels, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(pixels, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)


# ---------------------------------------------------------------------------------------------------
# finding the checkpoint


def resolve_checkpoint(checkpoint: str | os.PathLike, version: str, cache_dir: str | os.PathLike | None) -> Path:
    """A local file holding the HPS weights that ``checkpoint`` names.

    Forms, in the order tried:

    - ``hf://owner/repo[/file]``: ``hf_hub_download``, the file chosen by ``version`` unless given;
      ``HF_HUB_OFFLINE`` and ``cache_dir`` are honoured.
    - any other URI (``s3://``, ``gs://``, or whatever fsspec has a backend for): fetched once into
      ``<cache>/checkpoints/`` and reused from there afterwards.
    - an existing local file.
    - a bare hub id ``owner/repo`` (such as ``xswu/HPSv2``), when no such local path exists.

    Raises:
        FileNotFoundError: nothing exists at ``checkpoint``; the message names it and the forms accepted.
        ValueError: the URI's scheme has no fsspec backend.
    """
    text = os.fspath(checkpoint)
    if text.startswith("hf://"):
        repo_and_file = text[len("hf://"):].strip("/").split("/", 2)
        if len(repo_and_file) < 2:
            raise FileNotFoundError(f"hub checkpoint {text!r} must be hf://owner/repo or hf://owner/repo/file.pt")
        filename = repo_and_file[2] if len(repo_and_file) == 3 else HPS_HUB_FILES[version]
        return _download_hub("/".join(repo_and_file[:2]), filename, cache_dir)
    if "://" in text:
        return checkpoints.fetch_object(text, checkpoints.cache_dir(cache_dir) / "checkpoints", what="HPS checkpoint")
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if not path.exists() and _BARE_HUB_ID.fullmatch(text) and not text.endswith(_CHECKPOINT_SUFFIXES):
        return _download_hub(text, HPS_HUB_FILES[version], cache_dir)
    what = "is a directory, not a checkpoint file" if path.exists() else "does not exist"
    raise FileNotFoundError(
        f"HPS checkpoint {text!r} {what}; pass a local .pt file (e.g. HPS_v2.1_compressed.pt), a hub id "
        f"('{HPS_HUB_REPO}' or 'hf://owner/repo/file.pt') or an object-store URI (s3://bucket/key.pt)"
    )


def _download_hub(repo_id: str, filename: str, cache_dir: str | os.PathLike | None) -> Path:
    return checkpoints.fetch_hub(repo_id, cache_dir, filename=filename,
                                 what=f"HPS checkpoint {filename!r} of hub repo {repo_id!r}")


# ---------------------------------------------------------------------------------------------------
# building the model


def _read_model_cfg(model: Mapping[str, Any] | str | os.PathLike) -> tuple[dict[str, Any] | None, str]:
    """``(cfg, label)``: the ``open_clip.CLIP`` kwargs (``None`` for an open_clip name) and a label for errors."""
    if isinstance(model, Mapping):
        cfg = dict(model)
        label = "the given model_cfg"
    elif str(model).endswith(".json") or Path(model).is_file():
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model config {os.fspath(model)!r} does not exist")
        cfg = json.loads(path.read_text())
        label = f"model config {os.fspath(model)!r}"
    else:
        name = str(model)
        if name not in open_clip.list_models():
            close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
            raise ValueError(
                f"unknown open_clip architecture {name!r}; HPS v2 uses 'ViT-H-14'. Pass a name from "
                f"open_clip.list_models(){' such as ' + ', '.join(close) if close else ''}, a model_cfg dict "
                "or a path to a JSON file holding one"
            )
        return None, f"open_clip architecture {name!r}"
    # A fixture-style file wraps the kwargs as {"model_cfg": {...}}; open_clip's own JSONs are bare.
    cfg = dict(cfg.get("model_cfg", cfg))
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in cfg]
    if missing:
        raise ValueError(f"{label} lacks {', '.join(missing)}; it must hold the kwargs of open_clip.CLIP")
    return cfg, label


def _build_clip(model: Mapping[str, Any] | str | os.PathLike, device: torch.device) -> tuple[torch.nn.Module, Any, str]:
    """The randomly initialised open_clip ``CLIP``, its tokenizer, and a label naming the architecture."""
    cfg, label = _read_model_cfg(model)
    # Build on the target device: initialising ViT-H-14 (~1B parameters) is far quicker on a GPU.
    with torch.device(device):
        if cfg is None:
            clip = open_clip.create_model(
                str(model), pretrained=None, load_weights=False, device=device, output_dict=True
            )
            return clip, open_clip.get_tokenizer(str(model)), label
        try:
            clip = open_clip.CLIP(**cfg, output_dict=True)
        except TypeError as error:
            raise ValueError(f"{label} is not accepted by open_clip.CLIP: {error}") from error
    context_length = cfg["text_cfg"].get("context_length", 77)
    return clip, open_clip.tokenizer.SimpleTokenizer(context_length=context_length), label


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path``: ``checkpoint["state_dict"]`` (the released format) or a bare state dict."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"HPS checkpoint {str(path)!r} cannot be read as a torch weights file: {error}") from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(
            f"HPS checkpoint {str(path)!r} holds neither a 'state_dict' entry nor a bare state dict of tensors"
        )
    return dict(state)


# ---------------------------------------------------------------------------------------------------
# the scorer


class HPSv2Scorer(BatchedScorer):
    """HPS v2 / v2.1 of (image, prompt) pairs: cosine similarity of the normalised CLIP features.

    The model is built and loaded once, in ``__init__``; ``score`` runs batched forwards under
    ``torch.inference_mode`` and mutates nothing, so one instance serves a Ray actor for its lifetime
    and may be called from several threads. Scores are roughly 0.2-0.35 for matching pairs on the
    released checkpoints; multiply by 100 for the scale of the published benchmark numbers.

    Args:
        checkpoint: A local ``.pt`` file, a hub id (``"xswu/HPSv2"``, file chosen by ``version``, or
            ``"hf://owner/repo/file.pt"``) or an object-store URI (``s3://``, ``gs://``; fetched once
            into ``cache_dir``). The file holds ``{"state_dict": ...}`` or a bare state dict.
        model: An open_clip model name, a dict of ``open_clip.CLIP`` kwargs, or a JSON file holding
            one (bare or under ``"model_cfg"``).
        version: ``"v2"`` or ``"v2.1"``; picks the hub file. v2.1 (the default, as in hpsv2's benchmark)
            was trained on better data; scores of the two are not comparable.
        device: Torch device; defaults to ``cuda`` when available, else ``cpu``.
        dtype: Weight dtype; defaults to float16 on CUDA and float32 on CPU.
        cache_dir: Where hub and object-store downloads go (hub: ``hf_hub_download(cache_dir=...)``).
        batch_size: Images per forward pass; ``None`` scores each ``score`` call in one pass.
        resize_mode: ``"pad"`` (hpsv2's preprocessing) or ``"crop"``; see ``preprocess``.

    Raises:
        FileNotFoundError: The checkpoint or model config cannot be found.
        ValueError: Unknown architecture, unreadable checkpoint, or weights that do not fit it.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike = HPS_HUB_REPO,
        model: str | os.PathLike | Mapping[str, Any] = "ViT-H-14",
        version: Literal["v2", "v2.1"] = "v2.1",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int | None = None,
        resize_mode: Literal["pad", "crop"] = "pad",
    ) -> None:
        if version not in HPS_HUB_FILES:
            raise ValueError(f"unknown HPS version {version!r}; use one of {', '.join(HPS_HUB_FILES)}")
        if resize_mode not in ("pad", "crop"):
            raise ValueError(f"unknown resize_mode {resize_mode!r}; use 'pad' (hpsv2) or 'crop'")
        super().__init__(batch_size)
        self.version = version
        self.resize_mode = resize_mode
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device, cuda_default=torch.float16)

        self.checkpoint_path = resolve_checkpoint(checkpoint, version, cache_dir)
        clip, self._tokenizer, label = _build_clip(model, self.device)
        state = _read_state_dict(self.checkpoint_path)
        mismatch = checkpoints.state_dict_mismatch(clip, state)
        if mismatch:
            raise ValueError(f"HPS checkpoint {str(self.checkpoint_path)!r} does not match {label}: {mismatch}")
        clip.load_state_dict(state, strict=True)
        self._model = clip.to(dtype=self.dtype).eval().requires_grad_(False)
        height, width = to_2tuple(self._model.visual.image_size)
        if height != width:
            raise ValueError(f"{label} has a non-square image size {height}x{width}; HPS pads images to a square")
        self.image_size = height

    def _score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        pixels = torch.stack([preprocess(image, self.image_size, self.resize_mode) for image in images])
        tokens = self._tokenizer(list(prompts))
        with torch.inference_mode():
            image_features = self._model.encode_image(pixels.to(self.device, self.dtype))
            text_features = self._model.encode_text(tokens.to(self.device))
            # Normalise in fp32: the cosine is the score, and fp16 rounding would show in it.
            image_features = F.normalize(image_features.float(), dim=-1)
            text_features = F.normalize(text_features.float(), dim=-1)
            return (image_features * text_features).sum(dim=-1).tolist()


# The builders that ``actors.scoring.registry`` names ``hps-v2`` and ``hps-v2.1``.
def build_hps_v2(**options: Any) -> HPSv2Scorer:
    return HPSv2Scorer(version="v2", **options)


def build_hps_v2_1(**options: Any) -> HPSv2Scorer:
    return HPSv2Scorer(version="v2.1", **options)
