"""The ``shapes`` scorer: the probability that a scene image satisfies its caption, GenEval-style.

GenEval (Ghosh et al., arXiv 2310.11513) checks a generated image with an object detector: the right
number of objects, their colours, positions and relations. Here the detector is our
:class:`shapes.scene_detector.SceneDetector` (trained on rendered scenes, weights shipped in
``shapes/assets/shapes-scorer``) and the caption is read with :func:`shapes.scenes.parse_caption`. The score
of (image, caption) is a product of probabilities, each from the detector:

- count: the caption's ``n`` objects are the ``n`` most confident detections and there is no other
  (``prod p_i`` over the top ``n`` peak cells times ``prod (1 - p_j)`` over the other peaks);
- attributes: the best assignment of caption objects to those detections of the product of
  ``P(shape) P(colour) [P(size)] [P(position)]`` (shape from a classifier of the 24x24 window around
  the detected centre, the rest from the detector's cell), a position holding with probability
  ``sigmoid(margin / 1 px)`` of :func:`shapes.scenes.position_margin` at the detected centre;
- relation (if any): ``sigmoid(margin / 1 px)`` of :func:`shapes.scenes.relation_margin`;
- background (if named): its probability.

A score above 0.5 means "satisfied"; :func:`held_out_accuracy` measures that decision on held-out
scenes against their own captions and one-edit negatives (:func:`shapes.scenes.perturb`).
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from actors.scoring.base import BatchedScorer, check_pairs, chunks
from mgt.hub.devices import resolve_device, resolve_dtype
from shapes import scenes
from shapes.scene_detector import SHIPPED, Detections, SceneDetector, ShapeClassifier, crop_windows, peak_cells

if TYPE_CHECKING:
    from PIL import Image

POSITION_SHARPNESS = 1.0  # pixels: the soft position/relation checks are sigmoid(margin / this)
MAX_CANDIDATES = 8  # peak cells considered per image


class ShapesScorer(BatchedScorer):
    """Prompt faithfulness on the shapes domain, in [0, 1] (see the module docstring).

    Args:
        checkpoint: folder written by ``SceneDetector.save_pretrained``; unset: the shipped weights.
        device: torch device; defaults to ``cuda`` when available, else ``cpu``.
        dtype: weight dtype; the detector is tiny, so float32 unless asked.
        batch_size: images per forward pass; ``None`` scores each ``score`` call in one pass.

    Raises:
        FileNotFoundError: ``checkpoint`` holds no detector.
        ValueError: a prompt is not in the shapes grammar (the message shows the accepted forms).
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = "float32", batch_size: int | None = None) -> None:
        super().__init__(batch_size)
        folder = SHIPPED if checkpoint is None else checkpoint
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"no shapes detector in {os.fspath(folder)!r} (expected config.json and "
                                    "diffusion_pytorch_model.safetensors from `maskray train-shapes --part scorer`)")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device, cuda_default=torch.float16)
        self._detector = SceneDetector.from_pretrained(folder, torch_dtype=self.dtype).to(self.device).eval()
        self._shapes = ShapeClassifier.from_pretrained(os.path.join(folder, "shape_classifier"),
                                                       torch_dtype=self.dtype).to(self.device).eval()

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """Probability that ``images[i]`` satisfies ``prompts[i]``, in input order; every prompt is parsed before
        any image is scored, so a caption outside the grammar fails at once."""
        check_pairs(images, prompts)
        specs = [scenes.parse_caption(p) for p in prompts]
        scores: list[float] = []
        for part in chunks(len(images), self.batch_size):
            detections = self.detect(images[part])
            scores.extend(caption_probability(spec, detections, b) for b, spec in enumerate(specs[part]))
        return scores

    def detect(self, images: Sequence[Image.Image]) -> Detections:
        """Run the detector on PIL images (resized to 64x64 if they are not)."""
        size = (scenes.SIZE, scenes.SIZE)
        pixels = np.stack([np.asarray(im.convert("RGB").resize(size) if im.size != size else im.convert("RGB"))
                           for im in images])
        tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.device, self.dtype).div(255)
        with torch.inference_mode():
            detections = self._detector.detect(tensor)
            # the shape of each peak is read by the window classifier around its detected centre
            peaks = peak_cells(detections.objectness)
            b, r, c = peaks.nonzero().unbind(-1)
            if len(b):
                windows = crop_windows(tensor, detections.centres[b, r, c], b)
                detections.shape[b, r, c] = self._shapes(windows).softmax(-1).to(detections.shape.dtype)
        return Detections(*(t.float().cpu() for t in vars(detections).values()))


class CaptionFactors(NamedTuple):
    """The factors of one image's score (their product, :attr:`score`), for the best assignment of caption
    objects to detections: which part of a caption an image fails (``tests/benchmarks/shapes_factors.py``)."""

    count: float  # the caption's n objects are the n most confident detections and there is no other
    shape: float  # product over the caption's objects
    colour: float
    size_position: float  # sizes and absolute positions the caption names (1 if none)
    relation: float  # 1 without a relation
    background: float  # 1 if the caption names none

    @property
    def score(self) -> float:
        attributes = self.shape * self.colour * self.size_position * self.relation
        return self.count * attributes * self.background


def caption_probability(spec: scenes.CaptionSpec, det: Detections, b: int) -> float:
    """The score of image ``b`` of ``det`` against ``spec`` (count x attributes x relation x background)."""
    factors = caption_factors(spec, det, b)
    return 0.0 if factors is None else factors.score


def caption_factors(spec: scenes.CaptionSpec, det: Detections, b: int) -> CaptionFactors | None:
    """The factors of image ``b``'s score against ``spec``; ``None`` (score 0) when there are fewer detections
    than the caption has objects, so that no assignment exists."""
    peaks = peak_cells(det.objectness[b : b + 1])[0]
    order = det.objectness[b][peaks].argsort(descending=True)[:MAX_CANDIDATES]
    rows, cols = peaks.nonzero()[order].unbind(-1)
    p = det.objectness[b, rows, cols]
    instances = spec.instances()
    n = len(instances)
    if len(p) < n:
        return None
    count = float(p[:n].prod() * (1 - p[n:]).prod())
    def factors(assignment: tuple[int, ...]) -> tuple[float, float, float, float]:
        shape = colour = size_position = relation = 1.0
        for phrase, k in zip(instances, assignment):
            shape_k, colour_k, size_position_k = _attribute_probabilities(phrase, det, b, int(rows[k]), int(cols[k]))
            shape, colour, size_position = shape * shape_k, colour * colour_k, size_position * size_position_k
        if spec.relation:
            a, c = assignment[0], assignment[1]
            relation = _sigmoid(scenes.relation_margin(spec.relation, _centre(det, b, rows[a], cols[a]),
                                                       _centre(det, b, rows[c], cols[c])))
        return shape, colour, size_position, relation

    best = max(map(factors, itertools.permutations(range(n))), key=math.prod)
    background = 1.0
    if spec.background:
        background = float(det.background[b, list(scenes.BACKGROUNDS).index(spec.background)])
    return CaptionFactors(count, *best, background)


def _attribute_probabilities(phrase: scenes.ObjectPhrase, det: Detections, b: int, row: int,
                             col: int) -> tuple[float, float, float]:
    """P(shape), P(colour) and P(size) P(position) (the named ones) of the detection at ``(row, col)``."""
    shape = float(det.shape[b, row, col, scenes.SHAPES.index(phrase.shape)])
    colour = float(det.colour[b, row, col, list(scenes.COLOURS).index(phrase.colour)])
    size_position = 1.0
    if phrase.size:
        size_position *= float(det.size[b, row, col, list(scenes.SIZES).index(phrase.size)])
    if phrase.position:
        size_position *= _sigmoid(scenes.position_margin(phrase.position, *_centre(det, b, row, col)))
    return shape, colour, size_position


def _centre(det: Detections, b: int, row, col) -> tuple[float, float]:
    x, y = det.centres[b, int(row), int(col)].tolist()
    return x, y


def _sigmoid(margin: float) -> float:
    return 1 / (1 + math.exp(-margin / POSITION_SHARPNESS))


def held_out_accuracy(scorer: ShapesScorer, count: int = 1000, seed: int = 0) -> dict[str, float]:
    """Accuracy of ``score > 0.5`` on ``count`` held-out scenes with their captions and as many negatives.

    Each scene is scored against its own caption (label: satisfied) and against a one-edit negative
    (:func:`shapes.scenes.perturb`, checked unsatisfied against the true objects); the two halves are
    the same size, so the accuracy is the mean of the acceptance and rejection rates.
    """
    rng = random.Random(seed)
    images, batch = scenes.render_batch(scenes.held_out_seeds(count))
    pil = [_to_pil(image) for image in images]
    negatives = [scenes.write_caption(scenes.perturb(s, rng), rng) for s in batch]
    positive_scores = np.array(scorer.score(pil, [s.caption for s in batch]))
    negative_scores = np.array(scorer.score(pil, negatives))
    return {"accuracy": float(((positive_scores > 0.5).mean() + (negative_scores <= 0.5).mean()) / 2),
            "positives_accepted": float((positive_scores > 0.5).mean()),
            "negatives_rejected": float((negative_scores <= 0.5).mean()),
            "mean_score_positive": float(positive_scores.mean()), "mean_score_negative": float(negative_scores.mean()),
            "scenes": count}


def _to_pil(array: np.ndarray) -> Image.Image:
    from PIL import Image

    return Image.fromarray(array)
