"""CLIPScore (Hessel et al., arXiv 2104.08718) of (image, prompt) pairs with a transformers ``CLIPModel``."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from huggingface_hub.errors import HFValidationError
from transformers import CLIPModel, CLIPProcessor

from actors.scoring.base import BatchedScorer
from mgt.hub.devices import resolve_device, resolve_dtype

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


class CLIPScorer(BatchedScorer):
    """CLIPScore of (image, prompt) pairs: ``max(100 * cos(image, text), 0)``.

    The paper scales the cosine by ``w = 2.5``; we report ``100 * cos`` clipped at 0 instead, the
    convention of torchmetrics' ``CLIPScore`` and of most text-to-image papers, so numbers compare with
    those (about 20-35 for matching pairs on ViT-L/14). Images go through the model's own
    ``CLIPImageProcessor`` (RGB conversion, shorter-side resize, centre crop) and prompts are truncated
    to the text tower's context (77 tokens for the OpenAI models).

    The model is loaded once, in ``__init__``. ``score`` holds a lock only while tokenizing, because a
    Rust-backed tokenizer raises "Already borrowed" when two threads call it at once; the forward pass
    runs under ``torch.inference_mode`` and mutates nothing.

    Args:
        model: A hub id or a local folder written by ``CLIPModel.save_pretrained`` and
            ``CLIPProcessor.save_pretrained``.
        device: Torch device; defaults to ``cuda`` when available, else ``cpu``.
        dtype: Weight dtype; defaults to float16 on CUDA and float32 on CPU.
        batch_size: Images per forward pass; ``None`` scores each ``score`` call in one pass.

    Raises:
        FileNotFoundError: ``model`` is neither a loadable local folder nor a reachable hub id.
    """

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_CLIP_MODEL,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device, cuda_default=torch.float16)
        try:
            self._processor = CLIPProcessor.from_pretrained(model)
            clip = CLIPModel.from_pretrained(model, dtype=self.dtype)
        except (OSError, HFValidationError) as error:  # the latter: a missing local path is read as a hub id
            raise FileNotFoundError(
                f"cannot load CLIP model {os.fspath(model)!r}: pass a hub id that is cached or reachable "
                f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}) or a local folder holding "
                f"config.json, the weights and the processor files ({error})"
            ) from error
        self._model = clip.to(self.device).eval().requires_grad_(False)
        self._tokenizer_lock = threading.Lock()

    def _score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        with self._tokenizer_lock:
            inputs = self._processor(
                text=list(prompts), images=list(images), return_tensors="pt", padding=True, truncation=True
            )
        with torch.inference_mode():
            outputs = self._model(
                input_ids=inputs["input_ids"].to(self.device),
                attention_mask=inputs["attention_mask"].to(self.device),
                pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
            )
            # CLIPModel already normalises the embeddings; renormalising in fp32 keeps fp16 rounding out.
            image_embeds = F.normalize(outputs.image_embeds.float(), dim=-1)
            text_embeds = F.normalize(outputs.text_embeds.float(), dim=-1)
            cosine = (image_embeds * text_embeds).sum(dim=-1)
            return (100 * cosine).clamp(min=0).tolist()
