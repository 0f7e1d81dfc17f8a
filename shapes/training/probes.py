"""Measurements of whether a shapes generator draws the shape its caption names.

The mean shapes score mixes everything a caption asks for; these isolate the shape word, on held-out
single-object scenes, so that training recipes can be compared after minutes rather than hours:

- :func:`shape_swap_gap`: the object's cross-entropy when the caption names another shape, minus with the
  true caption, on the tokens where the two shapes' renders differ (teacher-forced, one forward pass);
- :func:`inpaint_shapes`: a box around the object is masked and redrawn by the sampler; which shape does
  the scorer read in the hole;
- :func:`generated_shapes`: which shape the scorer reads in a free generation of a one-object caption;
- :func:`encoder_shape_probe`: how well a linear probe reads the shape from the text encoder's pooled
  embedding (what the transformer can get from the caption at all);
- :func:`stray_pixels`: how many pixels of a generated image are specks (off-background blobs far too small
  to be an object), which the shapes score barely sees.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from mgt.editing import Edit
from shapes import scenes
from shapes.scene_detector import peak_cells
from shapes.training.data import render_tensors, training_seeds
from shapes.training.generator import MICRO_CONDS, mask_box, sampler_timestep, schedule_time
from shapes.training.vq import encode_tokens

TextEncode = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # captions -> (hidden states, pooled)
HOLE_MARGIN = 3.0  # pixels: the probes' hole reaches this far beyond the object's radius
NONE = "none"  # what the readers report when the scorer finds no object
STRAY_AREA = 12  # pixels: the largest speck; the smallest object (radius 5 +- 1) covers several times this
STRAY_TOLERANCE = 40  # summed |RGB difference| from the background above which a pixel is off-background


def single_object_scenes(count: int, start: int = 0) -> list[scenes.Scene]:
    """The first ``count`` held-out scenes (from held-out index ``start``) that hold exactly one object."""
    found, index = [], start
    while len(found) < count:
        seeds = scenes.held_out_seeds(256, start=index)
        found += [s for s in map(scenes.make_scene, seeds) if len(s.objects) == 1]
        index += 256
    return found[:count]


def other_shape(scene: scenes.Scene) -> str:
    """A shape other than the scene's object's, fixed by the scene's seed."""
    shape = scene.objects[0].shape
    return random.Random(scene.seed).choice([s for s in scenes.SHAPES if s != shape])


def with_shape(scene: scenes.Scene, shape: str) -> scenes.Scene:
    """The scene with its single object's shape (in the drawing and the caption) replaced by ``shape``."""
    old = scene.objects[0].shape
    caption = scene.caption.replace(scenes.PLURALS[old], scenes.PLURALS[shape]).replace(old, shape)
    return dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], shape=shape),), caption=caption)


def hole_mask(scene: scenes.Scene, grid: int, margin: float = HOLE_MARGIN) -> torch.Tensor:
    """`(grid, grid)` bool token cells touched by the box ``radius + margin`` around each object."""
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    for obj in scene.objects:
        mask_box(mask, obj.x, obj.y, obj.radius + margin)
    return mask


@torch.no_grad()
def shape_swap_gap(transformer, encode: TextEncode, vq, batch: Sequence[scenes.Scene], sampler_steps: int,
                   hole: bool = False) -> dict[str, float]:
    """Cross-entropy (nats) of the true tokens where the true and a swapped shape's renders differ, given
    the true caption and given the swapped one, and their difference ``gap`` (> 0: the shape word is read).

    ``hole=False`` masks every token (the sampler's first step); ``hole=True`` masks only the box around the
    object (:func:`hole_mask`), with the timestep of that masked fraction, leaving the background visible.
    """
    swapped = [with_shape(s, other_shape(s)) for s in batch]
    tokens, other_tokens = encode_tokens(vq, render_tensors(batch)), encode_tokens(vq, render_tensors(swapped))
    grid = tokens.shape[-1]
    if hole:
        mask = torch.stack([hole_mask(s, grid) for s in batch])
    else:
        mask = torch.ones_like(tokens, dtype=torch.bool)
    timesteps = sampler_timestep(schedule_time(mask.flatten(1).float().mean(1)), sampler_steps)
    masked = torch.where(mask, transformer.mask_token_id, tokens)
    where = mask & (tokens != other_tokens)
    micro = torch.tensor([MICRO_CONDS] * len(batch))
    losses = {}
    for name, captions in (("true", [s.caption for s in batch]), ("swapped", [s.caption for s in swapped])):
        hidden, pooled = encode(captions)
        logits = transformer(masked, hidden, pooled, micro, timesteps)
        losses[name] = F.cross_entropy(logits.permute(0, 2, 3, 1)[where], tokens[where]).item()
    return {**losses, "gap": losses["swapped"] - losses["true"], "tokens": int(where.sum())}


def read_single_shapes(scorer, images: Sequence[Image.Image]) -> list[str]:
    """The shape the ``shapes`` scorer reads at its most confident detection in each image (:data:`NONE`
    when no cell passes the detector's floor)."""
    if not images:
        return []
    detections = scorer.detect(images)
    read = []
    for b in range(len(images)):
        peaks = peak_cells(detections.objectness[b:b + 1])[0]
        if not peaks.any():
            read.append(NONE)
            continue
        score = torch.where(peaks, detections.objectness[b], torch.tensor(-1.0))
        row, col = divmod(int(score.argmax()), score.shape[-1])
        read.append(scenes.SHAPES[int(detections.shape[b, row, col].argmax())])
    return read


def inpaint_shapes(pipe, scorer, batch: Sequence[scenes.Scene], guidance: float | None = None,
                   steps: int | None = None) -> list[str]:
    """Mask the box around each scene's object (:func:`hole_mask` at pixel level), let ``pipe`` redraw it
    from the scene's caption (seed = scene seed), and return the shape the scorer reads there."""
    edits = []
    for scene in batch:
        mask = hole_mask(scene, scenes.SIZE).numpy().astype(np.uint8) * 255
        edits.append(Edit(scenes.render(scene), Image.fromarray(mask)))
    out = pipe.generate([s.caption for s in batch], [s.seed for s in batch], edits=edits, guidance=guidance,
                        steps=steps)
    return read_single_shapes(scorer, [Image.fromarray(im) for im in out.images])


def generated_shapes(pipe, scorer, batch: Sequence[scenes.Scene], guidance: float | None = None,
                     steps: int | None = None) -> list[str]:
    """Generate each scene's caption (seed = scene seed) and return the shape the scorer reads."""
    out = pipe.generate([s.caption for s in batch], [s.seed for s in batch], guidance=guidance, steps=steps)
    return read_single_shapes(scorer, [Image.fromarray(im) for im in out.images])


def confusion(truth: Sequence[str], read: Sequence[str]) -> dict[str, dict[str, int]]:
    """Counts ``{true shape: {read shape or none: n}}``."""
    table = {s: dict.fromkeys([*scenes.SHAPES, NONE], 0) for s in scenes.SHAPES}
    for t, r in zip(truth, read, strict=True):
        table[t][r] += 1
    return table


def accuracy(truth: Sequence[str], read: Sequence[str]) -> float:
    return float(np.mean([t == r for t, r in zip(truth, read, strict=True)]))


def encoder_shape_probe(encode: TextEncode, train: int = 1000, test: int = 500, steps: int = 300) -> float:
    """Held-out accuracy of a linear probe reading the object's shape from the pooled text embedding of
    one-object captions (probe trained on captions of training scenes, tested on held-out ones)."""
    def data(batch: list[scenes.Scene]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            _, pooled = encode([s.caption for s in batch])
        return pooled.float(), torch.tensor([scenes.SHAPES.index(s.objects[0].shape) for s in batch])

    candidates = (scenes.make_scene(s) for s in training_seeds(0, 0, 20 * train, part=5))
    train_x, train_y = data([s for s in candidates if len(s.objects) == 1][:train])
    test_x, test_y = data(single_object_scenes(test, start=20_000))
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    probe = torch.nn.Linear(train_x.shape[1], len(scenes.SHAPES))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    with torch.enable_grad():  # callers may evaluate under no_grad
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(probe((train_x - mean) / std), train_y).backward()
            optimizer.step()
    with torch.no_grad():
        return float((probe((test_x - mean) / std).argmax(-1) == test_y).float().mean())


def stray_pixels(image: Image.Image, max_area: int = STRAY_AREA, tolerance: int = STRAY_TOLERANCE) -> int:
    """Pixels of ``image`` in specks: 8-connected off-background components of at most ``max_area`` pixels.

    The background is the commonest colour (to 8 levels per channel) of the ring one pixel inside the edge;
    the outermost frame is left out, because the VQ decoder smears it even on plain reconstructions of
    rendered scenes. A rendered scene has none; a speck is what a sampler committed before the layout was decided.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)[1:-1, 1:-1]
    ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]) // 8
    levels, counts = np.unique(ring, axis=0, return_counts=True)
    background = levels[counts.argmax()] * 8 + 4
    off = np.abs(pixels - background).sum(-1) > tolerance
    labels, count = ndimage.label(off, structure=np.ones((3, 3)))
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return int(areas[areas <= max_area].sum())
