"""Prompts as ImageNet classes: how a class-conditional family (MaskGIT) reads a prompt.

A prompt is a class index (``"207"``) or a class name (``"golden retriever"``, any case), resolved through the
1000 ImageNet category names torchvision ships in its weights' metadata (no download). An empty prompt is the
unconditional sample (the transformer's "no class" token). An unknown name is refused with the closest names,
so a job can check its prompts before it starts.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from functools import cache

import torch


@cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order (torchvision's ``IMAGENET1K_V2`` metadata)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


@cache
def _index_of_name() -> dict[str, int]:
    return {name.lower(): index for index, name in enumerate(imagenet_classes())}


def class_index(prompt: str, num_classes: int = 1000) -> int | None:
    """The class of ``prompt``: an index in ``[0, num_classes)`` or an ImageNet name; None for ``""``.

    Raises a ValueError naming the closest class names when the prompt is neither.
    """
    text = prompt.strip()
    if not text:
        return None
    if text.isdigit():
        index = int(text)
        if index >= num_classes:
            raise ValueError(f"class index {index} is out of range: this model has classes 0..{num_classes - 1}")
        return index
    index = _index_of_name().get(text.lower())
    if index is None:
        close = difflib.get_close_matches(text.lower(), list(_index_of_name()), n=5, cutoff=0.5)
        hint = f"closest: {', '.join(repr(imagenet_classes()[_index_of_name()[c]]) for c in close)}" if close \
            else "e.g. 'golden retriever' or '207'"
        raise ValueError(f"prompt {prompt!r} is no ImageNet class; give a class name or an index 0-999 ({hint})")
    if index >= num_classes:
        raise ValueError(f"class {prompt!r} is index {index}, beyond this model's {num_classes} classes; give an "
                         f"index 0..{num_classes - 1}")
    return index


def check_class_prompts(prompts: Sequence[str], negative_prompt: str | None = None,
                        num_classes: int = 1000) -> None:
    """Raise a ValueError for the first prompt that is no class, or for any negative prompt (a class-conditional
    model has no negative conditioning: its guidance is against the unconditional "no class" token)."""
    if negative_prompt:
        raise ValueError(f"negative prompt {negative_prompt!r}: a class-conditional model takes none (its "
                         "guidance runs against the 'no class' token); remove --negative-prompt")
    for prompt in prompts:
        class_index(prompt, num_classes)


class ClassConditioner:
    """``(class_labels (B,), drop_label (B,))`` of prompts: the class ids, and True where the prompt is empty
    (the unconditional "no class" token, which is also guidance's unconditional branch)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def condition(self, prompts: Sequence[str], width: int, height: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        indices = [class_index(prompt, self.num_classes) for prompt in prompts]
        labels = torch.tensor([0 if i is None else i for i in indices], dtype=torch.long, device=device)
        drop = torch.tensor([i is None for i in indices], dtype=torch.bool, device=device)
        return labels, drop
