"""Scene batches as tensors: every training step draws fresh scenes, so the data never repeats."""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from shapes import scenes


def scene_tensors(seeds: Sequence[int], lattice: int = 0, anchors: bool = False, lessons: float = 0.0,
                  canonical: bool = False, kinds: Mapping[str, float] | None = None,
                  ) -> tuple[torch.Tensor, list[scenes.Scene]]:
    """``(B, 3, 64, 64)`` float32 images in [0, 1] (the range the pipeline's VQ decode clips to) and the scenes,
    snapped to a ``lattice`` of that many pixels when it is > 0 (:func:`snap_to_lattice`), laid out on
    :data:`ANCHORS` when ``anchors`` (:func:`place_on_anchors`) or in the caption's one canonical layout when
    ``canonical`` (:func:`canonical_layout`). The first ``round(lessons * B)`` seeds give :func:`lesson_scene` s
    instead, which are already exact and are left as they are; ``kinds`` reweights the caption kinds of the
    others (:func:`shapes.scenes.make_scene`)."""
    first = round(lessons * len(seeds))
    batch = [scenes.make_scene(int(s), kinds) for s in seeds[first:]]
    if lattice:
        batch = [snap_to_lattice(scene, lattice) for scene in batch]
    if canonical:
        batch = [canonical_layout(scene) for scene in batch]
    elif anchors:
        batch = [place_on_anchors(scene) for scene in batch]
    batch = [lesson_scene(int(s)) for s in seeds[:first]] + batch
    return render_tensors(batch), batch


def lesson_scene(seed: int) -> scenes.Scene:
    """The "lesson" of ``seed``: one object at a named position, exactly on it, at its size's nominal radius.

    Why (docs/shapes-training.md, "Lessons"): trained on one large object exactly in the center, the shipped
    architecture and recipe draw all five shapes right after 2000 steps, while on the full scene family it had
    not learnt shape after 10,000 (23 % on those very captions, chance 20 %); with the object's centre jittered
    by 3 px it had not either. Shape only decides an object's edge tokens, and where layout varies continuously
    their codes also depend on where the edge falls. Lesson scenes, mixed into the benchmark's, give the
    shape words a signal that layout does not blur. Their captions are the grammar's (size word optional,
    background named half the time), so they hold for the scene.
    """
    rng = random.Random(seed)
    shape, colour = rng.choice(scenes.SHAPES), rng.choice(list(scenes.COLOURS))
    background, size = rng.choice(list(scenes.BACKGROUNDS)), rng.choice(list(scenes.SIZES))
    position = rng.choice(list(scenes.POSITIONS))
    spec = scenes.CaptionSpec((scenes.ObjectPhrase(shape, colour, rng.choice([None, size]), position),), None,
                              background if rng.random() < 0.5 else None)
    x, y = scenes.POSITIONS[position]
    obj = scenes.SceneObject(shape, colour, size, float(x), float(y), float(scenes.SIZES[size]))
    return scenes.Scene(seed, background, (obj,), scenes.write_caption(spec, rng), spec)


ANCHORS = tuple(itertools.product((14.0, 32.0, 50.0), repeat=2))  # (x, y): the five named positions and corners


def place_on_anchors(scene: scenes.Scene, tries: int = 200) -> scenes.Scene:
    """``scene`` redrawn with every object centred on one of the 3x3 :data:`ANCHORS` (a named position on its
    own anchor) at its size's nominal radius, chosen at random (seeded by the scene) among the layouts that
    match the caption with the objects apart; ``scene`` unchanged if ``tries`` draws find none.

    Why: with centres and radii continuous, the first sampling steps may commit tokens of different possible
    objects and the model draws a blob where they meet. On anchors 18 px apart an object's every token is
    decided once a few of them are, while the caption's words (shape, colour, size, position, relation, count)
    keep their meaning: the scorer and the held-out scenes are unchanged. Measured (docs/shapes-training.md,
    "Objects on anchors"), it did not beat the shipped model, so it is off by default.
    """
    rng = random.Random(scene.seed)
    instances = scene.spec.instances()  # make_scene places the objects in this order
    for _ in range(tries):
        objects = []
        for phrase, obj in zip(instances, scene.objects):
            x, y = scenes.POSITIONS[phrase.position] if phrase.position else rng.choice(ANCHORS)
            objects.append(replace(obj, x=float(x), y=float(y), radius=float(scenes.SIZES[obj.size])))
        if scenes.apart(objects) and scenes.satisfies(scene.spec, objects, scene.background):
            return replace(scene, objects=tuple(objects))
    return scene


# Anchor slots of the canonical layouts, by the caption's structure (see canonical_layout): a pair on the
# left and right, a third object at the top (25.5 px from both, apart even when all three are large), the
# objects of a relation on the two ends of its axis, in the caption's order.
CANONICAL_SLOTS = {1: ("center",), 2: ("left", "right"), 3: ("left", "right", "top")}
RELATION_SLOTS = {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("top", "bottom"),
                  "below": ("bottom", "top")}


def canonical_layout(scene: scenes.Scene) -> scenes.Scene:
    """``scene`` redrawn in the one layout its caption's structure gets: each object at nominal radius on an anchor
    fixed by the caption alone (a named position on its own; otherwise :data:`CANONICAL_SLOTS` by the number of
    objects in the caption's order, or :data:`RELATION_SLOTS` for a relation).

    Why (docs/shapes-training.md, "Canonical layouts"): the shipped stages draw single objects right 85 % of the
    time, but in scenes of two objects the product of their two shape probabilities averages 0.025: their
    objects are blobs. Lessons taught single shapes by fixing the layout; with objects on random anchors the first
    steps of a two-object caption still predict a mixture of layouts, and which object goes where is not
    decided by anything the model reads (nor is which colour, measured on the binding probe). Here the order of
    the caption's words decides it. Every layout matches its caption with the objects apart (tested), so the
    scorer and the held-out scenes are unchanged.
    """
    instances = scene.spec.instances()  # make_scene places the objects in this order
    slots = (RELATION_SLOTS[scene.spec.relation] if scene.spec.relation
             else CANONICAL_SLOTS[len(instances)])
    objects = []
    for phrase, obj, slot in zip(instances, scene.objects, slots, strict=True):
        x, y = scenes.POSITIONS[phrase.position or slot]
        objects.append(replace(obj, x=float(x), y=float(y), radius=float(scenes.SIZES[obj.size])))
    return replace(scene, objects=tuple(objects))


def snap_to_lattice(scene: scenes.Scene, lattice: int) -> scenes.Scene:
    """``scene`` with its object centres moved to the nearest multiple of ``lattice`` pixels and their radii
    set to their size's nominal value, if it then still matches its caption with the objects inside the image
    and apart as :func:`shapes.scenes.make_scene` places them; otherwise ``scene`` unchanged.

    Why (docs/shapes-training.md): with centres and radii continuous, the generator's prediction for a
    token on an object's edge stays near 50/50 until the edge is placed, and a sampler that commits many
    tokens per step commits such tokens independently, which draws ragged blobs.
    """
    objects = tuple(replace(obj, x=float(round(obj.x / lattice) * lattice), y=float(round(obj.y / lattice) * lattice),
                            radius=float(scenes.SIZES[obj.size])) for obj in scene.objects)
    inside = all(o.radius <= o.x <= scenes.SIZE - o.radius and o.radius <= o.y <= scenes.SIZE - o.radius
                 for o in objects)
    if inside and scenes.apart(objects) and scenes.satisfies(scene.spec, objects, scene.background):
        return replace(scene, objects=objects)
    return scene


def render_tensors(batch: Sequence[scenes.Scene]) -> torch.Tensor:
    """``(B, 3, 64, 64)`` float32 images in [0, 1] of the given scenes (which may be edited copies)."""
    images = np.stack([np.asarray(scenes.render(s)) for s in batch])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)


def silhouette_maps(batch: Sequence[scenes.Scene]) -> torch.Tensor:
    """``(B, 64, 64)`` int64 colour-free labels of the scenes: 0 for background, ``1 + SHAPES.index(shape)``
    where an object covers the pixel (drawn at 4x as :func:`shapes.scenes.render` draws, then the label at
    each pixel's centre). The target of the generator's auxiliary silhouette head (``Recipe.silhouette``)."""
    big, step = scenes.SIZE * scenes.SUPERSAMPLE, scenes.SUPERSAMPLE
    maps = []
    for scene in batch:
        canvas = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(canvas)
        for obj in scene.objects:
            scenes.draw_object(draw, obj, 1 + scenes.SHAPES.index(obj.shape))
        maps.append(np.asarray(canvas)[step // 2::step, step // 2::step])
    return torch.from_numpy(np.stack(maps)).long()


def training_seeds(run_seed: int, step: int, batch_size: int, part: int = 0) -> list[int]:
    """The scene seeds of one training step, always below the held-out range.

    The same (run seed, part, step) always gives the same batch; each ``part`` (VQ, generator, detector)
    and each run seed reads its own stretch of 10 million scenes, so steps within it never repeat a scene.
    """
    start = ((run_seed * 8 + part) * 10_000_000 + step * batch_size) % (scenes.HELD_OUT_START - batch_size)
    return list(range(start, start + batch_size))
