"""Pre-training the text encoder to read the shapes grammar, before it is trained with the transformer.

Trained jointly from scratch, the encoder and the transformer wait on each other: the transformer has
no use for text features that say nothing, and the encoder gets gradient only through a transformer that
ignores it. Measured on the first shipped generator (6000 joint steps): with all tokens masked, its
probability of the true background code at background positions was 0.32 with the caption and 0.22
without, where a model that read the caption would reach about 0.6 (half the captions name the
background). So the encoder first learns, on captions alone (no images: seconds), to predict from its
pooled ``text_embeds`` everything the caption asks for: background, object count, relation and, per
object, shape, colour, size and position. Joint training then starts from features that carry it.
With it (1000 steps, 40 s; held-out accuracy of the heads 1.0) the same 6000 joint steps give 0.50 with
the caption and 0.23 without, and generated scenes take the caption's background (98 %) and colours.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from shapes import scenes
from shapes.training.data import training_seeds
from shapes.training.schedule import optimizer_step, warmup_cosine

MAX_OBJECTS = 3
# (name, classes): index 0 of an optional attribute means "not named"; per-object heads repeat per slot
SCENE_HEADS = (("background", 1 + len(scenes.BACKGROUNDS)), ("count", MAX_OBJECTS),
               ("relation", 1 + len(scenes.RELATIONS)))
OBJECT_HEADS = (("shape", len(scenes.SHAPES)), ("colour", len(scenes.COLOURS)), ("size", 1 + len(scenes.SIZES)),
                ("position", 1 + len(scenes.POSITIONS)))
IGNORE = -100  # target of an object slot the caption does not fill


def head_sizes() -> list[int]:
    """Classes of every prediction head, in the order of :func:`caption_targets`."""
    return [n for _, n in SCENE_HEADS] + [n for _ in range(MAX_OBJECTS) for _, n in OBJECT_HEADS]


def caption_targets(spec: scenes.CaptionSpec) -> list[int]:
    """The class of each head for one caption (objects in the caption's order; unused slots ``IGNORE``)."""
    def optional(value: str | None, names) -> int:
        return 0 if value is None else 1 + list(names).index(value)

    targets = [optional(spec.background, scenes.BACKGROUNDS), spec.num_objects - 1,
               optional(spec.relation, scenes.RELATIONS)]
    instances = spec.instances()
    for slot in range(MAX_OBJECTS):
        if slot < len(instances):
            p = instances[slot]
            targets += [scenes.SHAPES.index(p.shape), list(scenes.COLOURS).index(p.colour),
                        optional(p.size, scenes.SIZES), optional(p.position, scenes.POSITIONS)]
        else:
            targets += [IGNORE] * len(OBJECT_HEADS)
    return targets


def pretrain_text_encoder(tokenizer: CLIPTokenizer, encoder: CLIPTextModelWithProjection, seed: int, steps: int,
                          max_length: int, batch_size: int = 128, lr: float = 3e-3,
                          on_step: Callable[[int, float], None] | None = None) -> float:
    """Train ``encoder`` in place to predict each caption's contents from ``text_embeds``; returns the
    accuracy of all heads on 512 held-out captions (the heads are discarded)."""
    sizes = head_sizes()
    heads = torch.nn.Linear(encoder.config.projection_dim, sum(sizes))
    parameters = [*encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, steps, warmup=max(1, min(100, steps // 10)), floor=0.05)
    encoder.train()
    for step in range(steps):
        batch = [scenes.make_scene(s) for s in training_seeds(seed, step, batch_size, part=4)]
        logits = _logits(tokenizer, encoder, heads, [s.caption for s in batch], max_length)
        targets = torch.tensor([caption_targets(s.spec) for s in batch])
        loss = sum(F.cross_entropy(part, targets[:, i], ignore_index=IGNORE)
                   for i, part in enumerate(logits.split(sizes, dim=-1)))
        value = optimizer_step(optimizer, schedule, loss, clip=parameters)
        if on_step is not None:
            on_step(step, value)
    encoder.eval()
    held_out = [scenes.make_scene(s) for s in scenes.held_out_seeds(512)]
    with torch.no_grad():
        logits = _logits(tokenizer, encoder, heads, [s.caption for s in held_out], max_length)
    targets = torch.tensor([caption_targets(s.spec) for s in held_out])
    predictions = torch.stack([part.argmax(-1) for part in logits.split(sizes, dim=-1)], dim=-1)
    filled = targets != IGNORE
    return float((predictions == targets)[filled].float().mean())


def caption_ids(tokenizer: CLIPTokenizer, captions: list[str], max_length: int) -> torch.Tensor:
    """Token ids `(B, max_length)`, padded and truncated as the pipeline's text conditioner pads them."""
    return tokenizer(captions, padding="max_length", truncation=True, max_length=max_length,
                     return_tensors="pt").input_ids


def _logits(tokenizer: CLIPTokenizer, encoder: CLIPTextModelWithProjection, heads: torch.nn.Linear,
            captions: list[str], max_length: int) -> torch.Tensor:
    return heads(encoder(caption_ids(tokenizer, captions, max_length)).text_embeds)
