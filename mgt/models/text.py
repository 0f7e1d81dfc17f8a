"""Text conditioning: CLIP tokenizer + ``CLIPTextModelWithProjection``, as Meissonic and aMUSEd use it.

The transformer is conditioned on the *penultimate* hidden states (before ``final_layer_norm``) and on
``text_embeds`` (the projected pooled EOS state, not normalised).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import CLIPTextModelWithProjection, CLIPTokenizer


class TextConditioner:
    """Encodes prompts one at a time, so a prompt's embedding never depends on its batch-mates.

    Args:
        tokenizer: the model's ``CLIPTokenizer``.
        text_encoder: the model's ``CLIPTextModelWithProjection``.
        max_length: padded token length (Meissonic hard-codes 77; aMUSEd uses ``model_max_length``).
    """

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModelWithProjection, max_length: int):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = max_length
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
