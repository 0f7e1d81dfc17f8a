"""Text conditioning: CLIP tokenizer + ``CLIPTextModelWithProjection`` and micro-conditions, as Meissonic and
aMUSEd use them.

The transformer is conditioned on the *penultimate* hidden states (before ``final_layer_norm``), on
``text_embeds`` (the projected pooled EOS state, not normalised) and on the micro-conditions
``[width, height, crop_top, crop_left, score]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from mgt.hub import loading

TEXT_SUBFOLDERS = ("text_encoder", "tokenizer")


class TextConditioner:
    """Encodes prompts one at a time, so a prompt's embedding never depends on its batch-mates.

    Args:
        tokenizer: the model's ``CLIPTokenizer``.
        text_encoder: the model's ``CLIPTextModelWithProjection``.
        max_length: padded token length (Meissonic hard-codes 77; aMUSEd uses ``model_max_length``).
        micro_score: 5th micro-condition, the aesthetic/HPS score targeted in training.
    """

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModelWithProjection, max_length: int,
                 micro_score: float = 6.0):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = max_length
        self.micro_score = micro_score
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.inference_mode()
    def _encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        if prompt not in self._cache:
            if len(self._cache) > 1024:  # bounded: long jobs see millions of distinct prompts
                self._cache.clear()
            ids = self.tokenizer(
                [prompt], return_tensors="pt", padding="max_length", truncation=True, max_length=self.max_length
            ).input_ids.to(self.text_encoder.device)
            out = self.text_encoder(ids, return_dict=True, output_hidden_states=True)
            self._cache[prompt] = (out.hidden_states[-2][0], out.text_embeds[0])
        return self._cache[prompt]

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(hidden_states (B, max_length, D), text_embeds (B, P))``."""
        pairs = [self._encode_one(p) for p in prompts]
        return torch.stack([h for h, _ in pairs]), torch.stack([e for _, e in pairs])

    def micro_conds(self, batch: int, width: int, height: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
        """``[width, height, crop_top, crop_left, score]`` per row, as both reference pipelines build it."""
        row = torch.tensor([width, height, 0, 0, self.micro_score], dtype=dtype, device=device)
        return row.unsqueeze(0).expand(batch, -1)

    def condition(self, prompts: Sequence[str], width: int, height: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(hidden_states, text_embeds, micro_conds)`` of ``prompts``: the transformer's conditioning."""
        hidden, pooled = self.encode(prompts)
        return hidden.to(dtype), pooled.to(dtype), self.micro_conds(len(prompts), width, height, dtype, device)


def load_text_conditioner(model_dir: Path, dtype: torch.dtype, device: torch.device, variant: str | None,
                          text_max_length: int | None, micro_score: float = 6.0) -> TextConditioner:
    """The conditioner of ``model_dir/text_encoder`` and ``model_dir/tokenizer``.

    Args:
        text_max_length: padded prompt length; None takes the tokenizer's ``model_max_length``, at most 77.
        micro_score: see :class:`TextConditioner`.
    """
    folder = model_dir / "text_encoder"
    loading.read_config(folder)  # clear error when the folder is incomplete
    loading.weight_files(folder, "model", variant)
    text_encoder = CLIPTextModelWithProjection.from_pretrained(folder, dtype=dtype, variant=variant).to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    max_length = min(tokenizer.model_max_length, 77) if text_max_length is None else text_max_length
    return TextConditioner(tokenizer, text_encoder, max_length, micro_score)
