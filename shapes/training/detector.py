"""Training the scene detector of the ``shapes`` scorer on rendered scenes (``shapes.scene_detector``).

Targets come from each scene's true objects: the centre cell is positive (binary cross-entropy with a
positive weight, since 1-3 of 256 cells hold an object), the sub-cell offset is regressed there, and
shape, colour and size are classified there; the background colour is classified per image. Images
are lightly degraded (blur, noise) so the detector also reads the softer images a generator decodes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from shapes import scenes
from shapes.scene_detector import STRIDE, SceneDetector, ShapeClassifier, crop_windows
from shapes.training.data import scene_tensors, training_seeds
from shapes.training.schedule import optimizer_step, warmup_cosine

POSITIVE_WEIGHT = 20.0
ATTRIBUTE_REACH = 4.0  # pixels from an object's centre within which a cell learns its attributes


def targets(batch: list[scenes.Scene], grid: int) -> dict[str, torch.Tensor]:
    """Dense targets: ``heat`` `(B, G, G)` (1 at each object's centre cell); per object its centre
    ``cells`` `(N, 3)` and sub-cell ``offsets`` `(N, 2)`; and the cells that learn attributes,
    ``attribute_cells`` `(M, 3)`, with their ``shape``/``colour``/``size`` classes `(M,)`.

    Attributes are taught on every cell whose centre is within :data:`ATTRIBUTE_REACH` pixels of the
    object's centre (up to 3x3 cells), not only the centre cell: 9x the labels per scene, and the
    attributes stay readable when a generated object's peak lands one cell off.
    """
    heat = torch.zeros(len(batch), grid, grid)
    cells, offsets, attribute_cells, shapes, colours, sizes = [], [], [], [], [], []
    for b, scene in enumerate(batch):
        for obj in scene.objects:
            col, row = min(int(obj.x // STRIDE), grid - 1), min(int(obj.y // STRIDE), grid - 1)
            heat[b, row, col] = 1
            cells.append((b, row, col))
            offsets.append((obj.x / STRIDE - col, obj.y / STRIDE - row))
            for r in range(max(row - 1, 0), min(row + 2, grid)):
                for c in range(max(col - 1, 0), min(col + 2, grid)):
                    centre = ((c + 0.5) * STRIDE, (r + 0.5) * STRIDE)
                    if max(abs(centre[0] - obj.x), abs(centre[1] - obj.y)) <= ATTRIBUTE_REACH:
                        attribute_cells.append((b, r, c))
                        shapes.append(scenes.SHAPES.index(obj.shape))
                        colours.append(list(scenes.COLOURS).index(obj.colour))
                        sizes.append(list(scenes.SIZES).index(obj.size))
    backgrounds = [list(scenes.BACKGROUNDS).index(s.background) for s in batch]
    return {"heat": heat, "cells": torch.tensor(cells), "offsets": torch.tensor(offsets),
            "attribute_cells": torch.tensor(attribute_cells), "shape": torch.tensor(shapes),
            "colour": torch.tensor(colours), "size": torch.tensor(sizes), "background": torch.tensor(backgrounds)}


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blend each image with a 3x3 blur of itself (weight ~U(0,1)) and add Gaussian noise (sigma ~U(0,0.04))."""
    batch = images.shape[0]
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    weight = torch.rand(batch, 1, 1, 1, generator=generator)
    sigma = torch.rand(batch, 1, 1, 1, generator=generator) * 0.04
    noise = torch.randn(images.shape, generator=generator) * sigma
    return (images * (1 - weight) + blurred * weight + noise).clamp(0, 1)


def detector_loss(model: SceneDetector, images: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
    cells, background = model(images)
    heat, offset, shape, colour, size = cells.permute(0, 2, 3, 1).split(model.split, dim=-1)
    b, r, c = target["cells"].unbind(-1)
    loss = F.binary_cross_entropy_with_logits(heat[..., 0], target["heat"], pos_weight=torch.tensor(POSITIVE_WEIGHT))
    loss = loss + F.l1_loss(offset[b, r, c].sigmoid(), target["offsets"])
    b, r, c = target["attribute_cells"].unbind(-1)
    loss = loss + F.cross_entropy(shape[b, r, c], target["shape"]) + F.cross_entropy(colour[b, r, c], target["colour"])
    loss = loss + F.cross_entropy(size[b, r, c], target["size"])
    return loss + F.cross_entropy(background, target["background"])


def train_detector(seed: int, steps: int, batch_size: int = 32, lr: float = 3e-3,
                   on_step: Callable[[int, float], None] | None = None) -> SceneDetector:
    """Train a fresh detector for ``steps`` steps on new scenes each step; reproducible by ``seed``."""
    torch.manual_seed(seed)
    model = SceneDetector().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = warmup_cosine(optimizer, steps, warmup=30, floor=0.02)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        images, batch = scene_tensors(training_seeds(seed, step, batch_size, part=2))
        loss = detector_loss(model, degrade(images, generator), targets(batch, images.shape[-1] // STRIDE))
        value = optimizer_step(optimizer, schedule, loss)
        if on_step is not None:
            on_step(step, value)
    return model.eval().requires_grad_(False)


def train_shape_classifier(seed: int, steps: int, batch_size: int = 32, lr: float = 3e-3,
                           on_step: Callable[[int, float], None] | None = None) -> ShapeClassifier:
    """Train the window shape classifier on every object of ``batch_size`` fresh scenes per step.

    Windows are centred on the true centre plus up to 2 px of jitter (a detected centre is off by
    about 0.5 px on rendered scenes, more on generated ones).
    """
    torch.manual_seed(seed)
    model = ShapeClassifier().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = warmup_cosine(optimizer, steps, warmup=30, floor=0.02)
    generator = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        images, batch = scene_tensors(training_seeds(seed, step, batch_size, part=3))
        objects = [(b, o) for b, scene in enumerate(batch) for o in scene.objects]
        centres = torch.tensor([(o.x, o.y) for _, o in objects])
        centres = centres + (torch.rand(centres.shape, generator=generator) * 4 - 2)
        crops = crop_windows(degrade(images, generator), centres, torch.tensor([b for b, _ in objects]))
        labels = torch.tensor([scenes.SHAPES.index(o.shape) for _, o in objects])
        loss = F.cross_entropy(model(crops), labels)
        value = optimizer_step(optimizer, schedule, loss)
        if on_step is not None:
            on_step(step, value)
    return model.eval().requires_grad_(False)
