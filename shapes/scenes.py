"""Procedural shape scenes with captions: the toy domain of the ``shapes-meissonic`` model and ``shapes`` scorer.

A scene is a 64x64 RGB image of one to three flat-coloured objects (shape, colour, size, position) on a
coloured background, with a caption in a small closed grammar (GenEval's kinds of prompt: single object
with an optional absolute position, two objects in a spatial relation, two or three listed objects, and
counting). ``make_scene(seed)`` is deterministic and unlimited; seeds from :data:`HELD_OUT_START` on are
never used for training, so they are the held-out scenes and captions.

Besides the image and caption, a scene carries its structured description (the objects' true attributes
and centres) and the parsed caption (:class:`CaptionSpec`), so that the scorer can be trained and checked.
:func:`parse_caption` reads any caption of the grammar back; :func:`satisfies` is the ground-truth check of
a caption against a list of objects, with the same geometric rules the scorer applies softly.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down, for anti-aliased edges
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 230), "yellow": (245, 215, 40),
           "orange": (245, 135, 25), "purple": (145, 60, 200), "pink": (250, 140, 200), "cyan": (40, 205, 215)}
BACKGROUNDS = {"white": (240, 240, 240), "black": (25, 25, 25), "gray": (125, 125, 125), "beige": (215, 200, 160)}
SIZES = {"small": 6, "large": 11}  # radius in pixels (half the bounding-box side), jittered by +-1
POSITIONS = {"left": (14, 32), "right": (50, 32), "top": (32, 14), "bottom": (32, 50), "center": (32, 32)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "center": "in the center"}
RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
NUMBERS = {1: "a", 2: "two", 3: "three"}
PREFIXES = ("", "a picture of ", "an image of ", "there is ")
HELD_OUT_START = 1_000_000_000  # scene seeds >= this are never trained on
MARGIN = 8.0  # pixels: "left" means at least this far left of the centre (or of the other object)
KINDS = (("single", 0.35), ("relation", 0.25), ("pair", 0.15), ("triple", 0.1), ("count", 0.15))


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: attributes and its bounding-box centre ``(x, y)`` in pixels of the 64x64 image."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class ObjectPhrase:
    """One noun phrase of a caption: ``count`` objects of this shape and colour (size and position optional)."""

    shape: str
    colour: str
    size: str | None = None
    position: str | None = None
    count: int = 1


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for. ``relation`` (a key of :data:`RELATIONS`) relates phrase 0 to phrase 1."""

    phrases: tuple[ObjectPhrase, ...]
    relation: str | None = None
    background: str | None = None

    @property
    def num_objects(self) -> int:
        return sum(p.count for p in self.phrases)

    @property
    def kind(self) -> str:
        """GenEval's kind of the caption: relation, count (a phrase of several objects), single, pair or triple."""
        if self.relation:
            return "relation"
        if any(p.count > 1 for p in self.phrases):
            return "count"
        return {1: "single", 2: "pair"}.get(len(self.phrases), "triple")

    def instances(self) -> list[ObjectPhrase]:
        """One phrase per object the caption asks for (a phrase with count 2 appears twice)."""
        return [p for p in self.phrases for _ in range(p.count)]


@dataclass(frozen=True)
class Scene:
    seed: int
    background: str
    objects: tuple[SceneObject, ...]
    caption: str
    spec: CaptionSpec


# ---------------------------------------------------------------------------------------------------
# generation


def make_scene(seed: int, kinds: Mapping[str, float] | None = None) -> Scene:
    """The scene of ``seed``: same seed, same scene, on every machine (Python's ``random.Random``).

    ``kinds`` reweights the caption kinds (names of :data:`KINDS`; a kind left out is never drawn) for training
    streams that need more of some; None draws by :data:`KINDS`, as the benchmark's captions are."""
    rng = random.Random(seed)
    weights = dict(KINDS) if kinds is None else {k: kinds.get(k, 0.0) for k, _ in KINDS}
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    background = rng.choice(list(BACKGROUNDS))
    if kind == "single":
        phrase = ObjectPhrase(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice([None, *SIZES]),
                              rng.choice([None, None, *POSITIONS]))
        spec_phrases, relation = (phrase,), None
    elif kind == "relation":
        spec_phrases, relation = _distinct_phrases(rng, 2), rng.choice(list(RELATIONS))
    elif kind in ("pair", "triple"):
        spec_phrases, relation = _distinct_phrases(rng, 2 if kind == "pair" else 3), None
    else:
        spec_phrases = (ObjectPhrase(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice([None, *SIZES]),
                                     count=rng.choice([2, 3])),)
        relation = None
    spec = CaptionSpec(spec_phrases, relation, background if rng.random() < 0.5 else None)
    objects = _place(rng, spec)
    return Scene(seed, background, objects, write_caption(spec, rng), spec)


def held_out_seeds(count: int, start: int = 0) -> list[int]:
    """``count`` held-out scene seeds (never used in training), from the ``start``-th on."""
    return [HELD_OUT_START + start + i for i in range(count)]


def _distinct_phrases(rng: random.Random, count: int) -> tuple[ObjectPhrase, ...]:
    pairs = rng.sample([(s, c) for s in SHAPES for c in COLOURS], count)  # no two phrases name the same object
    return tuple(ObjectPhrase(shape, colour) for shape, colour in pairs)


def _place(rng: random.Random, spec: CaptionSpec) -> tuple[SceneObject, ...]:
    """Draw sizes and centres that satisfy ``spec`` with margin and do not overlap (rejection sampling)."""
    instances = spec.instances()
    while True:
        objects = []
        for phrase in instances:
            size = phrase.size or rng.choice(list(SIZES))
            radius = SIZES[size] + rng.uniform(-1, 1)
            if phrase.position:
                ax, ay = POSITIONS[phrase.position]
                x, y = ax + rng.uniform(-3, 3), ay + rng.uniform(-3, 3)
            else:
                x, y = rng.uniform(radius + 2, SIZE - radius - 2), rng.uniform(radius + 2, SIZE - radius - 2)
            objects.append(SceneObject(phrase.shape, phrase.colour, size, x, y, radius))
        # the relation is drawn with twice the margin the check asks for, so a placed scene satisfies it clearly
        related = spec.relation is None or _relation_margin(spec.relation, objects[0], objects[1]) > MARGIN
        if apart(objects) and related:
            return tuple(objects)


def apart(objects: Sequence[SceneObject]) -> bool:
    """Whether no two objects come closer than their radii plus 3 px (how :func:`make_scene` places them)."""
    return all(((a.x - b.x) ** 2 + (a.y - b.y) ** 2) ** 0.5 > a.radius + b.radius + 3
               for a, b in itertools.combinations(objects, 2))


def write_caption(spec: CaptionSpec, rng: random.Random) -> str:
    """One of several templates for ``spec``; :func:`parse_caption` reads every one of them back."""
    nps = [_noun_phrase(p) for p in spec.phrases]
    if spec.relation:
        body = f"{nps[0]} {RELATIONS[spec.relation]} {nps[1]}"
    elif len(nps) == 3:
        body = f"{nps[0]}, {nps[1]} and {nps[2]}"
    elif len(nps) == 2:
        body = f"{nps[0]} and {nps[1]}"
    else:
        body = nps[0] + (f" {POSITION_PHRASES[spec.phrases[0].position]}" if spec.phrases[0].position else "")
    prefix = rng.choice(PREFIXES)
    if prefix == "there is " and spec.phrases[0].count > 1:
        prefix = "there are "
    if spec.background is None:
        return prefix + body
    if prefix == "" and rng.random() < 0.5:
        return f"{_article(spec.background)} {spec.background} background with {body}"
    return f"{prefix}{body} on {_article(spec.background)} {spec.background} background"


def _noun_phrase(phrase: ObjectPhrase) -> str:
    words = [w for w in (phrase.size, phrase.colour) if w]
    noun = PLURALS[phrase.shape] if phrase.count > 1 else phrase.shape
    determiner = NUMBERS[phrase.count] if phrase.count > 1 else _article(words[0])
    return " ".join([determiner, *words, noun])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------------
# rendering


def render(scene: Scene) -> Image.Image:
    """The 64x64 RGB image of ``scene`` (drawn at 4x and box-filtered down)."""
    image = Image.new("RGB", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw_object(draw, obj, COLOURS[obj.colour])
    return image.resize((SIZE, SIZE), Image.Resampling.BOX)


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill) -> None:
    """Draw ``obj``'s silhouette in ``fill`` on a canvas ``SUPERSAMPLE`` times the image size."""
    x, y, r = obj.x * SUPERSAMPLE, obj.y * SUPERSAMPLE, obj.radius * SUPERSAMPLE
    if obj.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif obj.shape == "square":
        s = r * 0.9  # a square of the same radius looks larger than the circle; keep areas comparable
        draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    else:  # cross: a plus sign with arms 0.4 r wide on each side of the centre line
        w = r * 0.4
        draw.rectangle([x - r, y - w, x + r, y + w], fill=fill)
        draw.rectangle([x - w, y - r, x + w, y + r], fill=fill)


def render_batch(seeds: Sequence[int]) -> tuple[np.ndarray, list[Scene]]:
    """``(B, 64, 64, 3)`` uint8 images and the scenes of ``seeds``."""
    scenes = [make_scene(int(s)) for s in seeds]
    return np.stack([np.asarray(render(s)) for s in scenes]), scenes


# ---------------------------------------------------------------------------------------------------
# reading captions back and checking them


def vocabulary() -> list[str]:
    """Every word a caption can use, ordered so that ``mgt.models.tiny.write_tokenizer`` makes each a single token.

    That tokenizer adds each word's merges left to right, and an earlier word's first merge can split a
    later word (``bottom``'s ``b+o`` would split ``above``): longest words first, then the few such
    victims moved to the front, avoids every clash (``tests/shapes/test_shapes.py`` checks it).
    """
    words = set(SHAPES) | set(PLURALS.values()) | set(COLOURS) | set(BACKGROUNDS) | set(SIZES)
    for phrase in (*POSITION_PHRASES.values(), *RELATIONS.values(), *PREFIXES, *NUMBERS.values(),
                   "there are an and background with"):
        words.update(phrase.split())
    ordered = sorted(words, key=lambda w: (-len(w), w))
    return ["above"] + [w for w in ordered if w != "above"]


_NOUNS = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
_NP = re.compile(r"\b(a|an|two|three) (?:(" + "|".join(SIZES) + r") )?(" + "|".join(COLOURS) + r") ("
                 + "|".join(_NOUNS) + r")\b")
_COUNTS = {"a": 1, "an": 1, "two": 2, "three": 3}


def parse_caption(caption: str) -> CaptionSpec:
    """The :class:`CaptionSpec` of a caption written in the scene grammar.

    Raises:
        ValueError: the caption is not in the grammar; the message shows the accepted forms.
    """
    text = " ".join(caption.lower().replace(",", " , ").replace(".", " ").split()).replace(" ,", ",")
    background = None
    if match := re.fullmatch(r"an? (\w+) background with (.*)", text):
        background, text = match[1], match[2]
    elif match := re.fullmatch(r"(.*) on an? (\w+) background", text):
        text, background = match[1], match[2]
    if background is not None and background not in BACKGROUNDS:
        raise _grammar_error(caption, f"unknown background colour {background!r}")
    for prefix in (*PREFIXES[1:], "there are "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    position = None
    for key, phrase in {**POSITION_PHRASES, "center": "in the center", "centre": "in the centre"}.items():
        if text.endswith(" " + phrase):
            position, text = ("center" if key == "centre" else key), text[: -len(phrase) - 1]
    matches = list(_NP.finditer(text))
    gaps = [text[a.end():b.start()] for a, b in zip(matches, matches[1:])]
    if not matches or matches[0].start() != 0 or matches[-1].end() != len(text):
        raise _grammar_error(caption, "expected noun phrases such as 'a small red circle' or 'two blue squares'")
    phrases = []
    for m in matches:
        count = _COUNTS[m[1]]
        if (count > 1) != (m[4] in PLURALS.values()):
            raise _grammar_error(caption, f"{m[0]!r} mixes singular and plural")
        phrases.append(ObjectPhrase(_NOUNS[m[4]], m[3], m[2], None, count))
    relation = None
    if len(phrases) == 1:
        phrases[0] = ObjectPhrase(phrases[0].shape, phrases[0].colour, phrases[0].size, position, phrases[0].count)
    elif position is not None or any(p.count > 1 for p in phrases):
        raise _grammar_error(caption, "positions and counts apply to single-phrase captions only")
    elif len(phrases) == 2 and gaps[0].strip() in {v: k for k, v in RELATIONS.items()}:
        relation = {v: k for k, v in RELATIONS.items()}[gaps[0].strip()]
    elif gaps not in ([" and "], [", ", " and "], [", ", ", and "]):
        raise _grammar_error(caption, f"phrases must be joined by a relation ({', '.join(RELATIONS.values())}) "
                                      "or listed as 'A and B' / 'A, B and C'")
    return CaptionSpec(tuple(phrases), relation, background)


def _grammar_error(caption: str, why: str) -> ValueError:
    return ValueError(
        f"caption {caption!r} is not in the shapes grammar ({why}); write e.g. 'a small red circle on the left', "
        "'a red circle above a blue square', 'a red circle, a blue square and a green triangle', "
        f"'three yellow crosses on a gray background'; shapes {', '.join(SHAPES)}; colours {', '.join(COLOURS)}"
    )


def position_margin(position: str, x: float, y: float) -> float:
    """How far (pixels) a centre is inside ``position``'s region; > 0 means the position holds.

    ``left`` holds when the centre is more than :data:`MARGIN` left of the image centre *and* further left
    than it is up or down (so a top-left object is neither clearly "left" nor "top" unless it leans one way).
    ``center`` holds within :data:`MARGIN` of the image centre on both axes.
    """
    dx, dy = x - SIZE / 2, y - SIZE / 2
    if position == "center":
        return MARGIN - max(abs(dx), abs(dy))
    along, across = {"left": (-dx, dy), "right": (dx, dy), "top": (-dy, dx), "bottom": (dy, dx)}[position]
    return min(along - MARGIN, along - abs(across))


def relation_margin(relation: str, a: tuple[float, float], b: tuple[float, float]) -> float:
    """How far (pixels) centre ``a`` is in ``relation`` to centre ``b``; > 0 means it holds."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return min(along - MARGIN, along - abs(across))


def _relation_margin(relation: str, a: SceneObject, b: SceneObject) -> float:
    return relation_margin(relation, (a.x, a.y), (b.x, b.y))


def satisfies(spec: CaptionSpec, objects: Sequence[SceneObject], background: str) -> bool:
    """Whether a scene with ``objects`` on ``background`` matches ``spec`` (count, attributes, geometry)."""
    instances = spec.instances()
    if len(objects) != len(instances) or (spec.background and spec.background != background):
        return False
    for order in itertools.permutations(objects):
        if all(_object_matches(p, o) for p, o in zip(instances, order)) and (
                spec.relation is None or _relation_margin(spec.relation, order[0], order[1]) > 0):
            return True
    return False


def _object_matches(phrase: ObjectPhrase, obj: SceneObject) -> bool:
    return (phrase.shape == obj.shape and phrase.colour == obj.colour and phrase.size in (None, obj.size)
            and (phrase.position is None or position_margin(phrase.position, obj.x, obj.y) > 0))


def perturb(scene: Scene, rng: random.Random) -> CaptionSpec:
    """A caption spec that ``scene`` does *not* satisfy, one edit away from its own (a hard negative).

    Edits: another colour, shape or size for one phrase, another position, the opposite relation, one
    object more or fewer, another background. Used to measure the scorer's accuracy.
    """
    spec = scene.spec
    while True:
        phrases = list(spec.phrases)
        index = rng.randrange(len(phrases))
        p = phrases[index]
        edit = rng.choice(["colour", "shape", "size", "position", "relation", "count", "background"])
        relation, background = spec.relation, spec.background
        if edit == "colour":
            phrases[index] = ObjectPhrase(p.shape, rng.choice(list(COLOURS)), p.size, p.position, p.count)
        elif edit == "shape":
            phrases[index] = ObjectPhrase(rng.choice(SHAPES), p.colour, p.size, p.position, p.count)
        elif edit == "size":
            phrases[index] = ObjectPhrase(p.shape, p.colour, rng.choice(list(SIZES)), p.position, p.count)
        elif edit == "position" and len(phrases) == 1:
            phrases[index] = ObjectPhrase(p.shape, p.colour, p.size, rng.choice(list(POSITIONS)), p.count)
        elif edit == "relation" and relation:
            relation = rng.choice([r for r in RELATIONS if r != relation])
        elif edit == "count" and len(phrases) == 1:
            phrases[index] = ObjectPhrase(p.shape, p.colour, p.size, None, rng.choice([c for c in NUMBERS if c != p.count]))
        elif edit == "count" and relation is None:
            phrases = phrases[:-1] if len(phrases) == 3 or rng.random() < 0.5 else [*phrases, *_distinct_phrases(rng, 1)]
        elif edit == "background":
            background = rng.choice([b for b in BACKGROUNDS if b != scene.background])
        candidate = CaptionSpec(tuple(phrases), relation, background)
        if not satisfies(candidate, scene.objects, scene.background):
            return candidate
