"""A model family from outside maskray, registered through entry points alone (``tests/test_family_plugin.py``).

A class-conditional toy, as MaskGIT conditions on ImageNet classes: a prompt is a class label (``"0"`` to
``"9"``; ``""`` is unconditional, the null class) and the transformer is a per-token network over the token
and label embeddings. Its models hold ``transformer/`` and ``vqvae/`` only: no text encoder, no tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from mgt.models.families import ModelFamily
from mgt.models.tiny import CODEBOOK, tiny_vqvae
from mgt.models.token_grid import TokenGridMixin


class LabelTransformer(TokenGridMixin, ModelMixin, ConfigMixin):
    """Logits of each token from its own embedding plus its image's class-label embedding."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, num_classes: int = 10, codebook_size: int = CODEBOOK, vocab_size: int = CODEBOOK + 1,
                 width: int = 16, downsample: bool = False):
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, width)
        self.label_embed = nn.Embedding(num_classes + 1, width)  # the last label is the null class
        self.out = nn.Linear(width, codebook_size)

    def forward(self, token_ids: torch.Tensor, labels: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        hidden = self.token_embed(token_ids) + self.label_embed(labels)[:, None, None]
        return self.out(torch.relu(hidden)).permute(0, 3, 1, 2)


class LabelConditioner:
    """Prompts as class labels: the transformer's conditioning is one label id per image."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def condition(self, prompts: Sequence[str], width: int, height: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor]:
        labels = []
        for prompt in prompts:
            if prompt != "" and not (prompt.isdigit() and int(prompt) < self.num_classes):
                raise ValueError(f"prompt {prompt!r} is not a class label: give 0 to {self.num_classes - 1}, "
                                 "or '' for none")
            labels.append(int(prompt) if prompt else self.num_classes)
        return (torch.tensor(labels, device=device),)


def load_label_conditioner(model_dir: Path, dtype: torch.dtype, device: torch.device,
                           variant: str | None) -> LabelConditioner:
    config = json.loads((model_dir / "transformer" / "config.json").read_text())
    return LabelConditioner(config["num_classes"])


LABELS = ModelFamily(
    name="labels",
    transformer=LabelTransformer,
    class_names=("LabelTransformer",),
    defaults=lambda transformer, vq_scale: dict(steps=4, guidance=2.0, negative_prompt="", width=8 * vq_scale,
                                                height=8 * vq_scale),
    load_conditioner=load_label_conditioner,
    subfolders=(),
    tiny_transformer=LabelTransformer,
    model_index={"_class_name": "LabelPipeline", "scheduler": ["scheduler", "Scheduler"],
                 "transformer": ["plugin_family", "LabelTransformer"]},
)


def build_tiny_labels(folder: Path) -> None:
    """The registered model ``tiny-labels``: a random label transformer and the tiny VQ model."""
    torch.manual_seed(0)
    LABELS.tiny_transformer().save_pretrained(Path(folder) / "transformer")
    tiny_vqvae().save_pretrained(Path(folder) / "vqvae")
