"""The generator's training recipe (object holes, high mask ratios, a frozen text encoder) and the probes that
measure whether a generator reads the shape word."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import mgt
from mgt.models.tiny import write_tokenizer
from shapes import scenes
from shapes.training import probes
from shapes.training.config import TrainShapesConfig
from shapes.training.data import (
    ANCHORS,
    canonical_layout,
    lesson_scene,
    place_on_anchors,
    scene_tensors,
    silhouette_maps,
    snap_to_lattice,
)
from shapes.training.generator import (
    HIGH_MASK_RATE,
    Recipe,
    build_text_encoder,
    mask_tokens,
    object_holes,
    schedule_time,
    train_generator,
)
from shapes.training.vq import build_vqvae


def _object_cells(scene: scenes.Scene, grid: int) -> torch.Tensor:
    """Token cells that hold any pixel differing from the background."""
    pixels = np.asarray(scenes.render(scene)).astype(int)
    background = np.array(scenes.BACKGROUNDS[scene.background])
    touched = torch.from_numpy(np.abs(pixels - background).sum(-1) > 0)
    cell = scenes.SIZE // grid
    return touched.reshape(grid, cell, grid, cell).any(dim=3).any(dim=1)


def test_object_holes_cover_every_object_and_only_the_chosen_share():
    batch = [scenes.make_scene(seed) for seed in range(64)]
    holes = object_holes(batch, 32, torch.Generator().manual_seed(0), share=1.0)
    for scene, hole in zip(batch, holes):
        assert not (_object_cells(scene, 32) & ~hole).any(), scene.caption  # the whole object is hidden
        # and each box stays local: at most (radius + 5 px margin + 2 px jitter) on each side, in 2-px cells
        assert int(hole.sum()) <= sum((int(2 * (o.radius + 7) // 2) + 1) ** 2 for o in scene.objects)
    assert not object_holes(batch, 32, torch.Generator().manual_seed(0), share=0.0).any()
    chosen = object_holes(batch, 32, torch.Generator().manual_seed(0), share=0.5).flatten(1).any(1)
    assert 16 <= int(chosen.sum()) <= 48


def test_subset_holes_leave_some_objects_of_a_scene_visible_and_hide_at_least_one():
    batch = [s for s in map(scenes.make_scene, range(200)) if len(s.objects) >= 2][:64]
    holes = object_holes(batch, 32, torch.Generator().manual_seed(0), share=1.0, subset_share=1.0)
    hidden = [[not (_object_cells(replace(s, objects=(o,)), 32) & ~hole).any() for o in s.objects]
              for s, hole in zip(batch, holes)]
    assert all(any(h) for h in hidden)  # every hole sample still hides an object
    assert sum(not all(h) for h in hidden) >= len(batch) // 3  # and most keep one in view (1/2 per object)
    again = object_holes(batch, 32, torch.Generator().manual_seed(0), share=1.0, subset_share=0.0)
    assert torch.equal(again, object_holes(batch, 32, torch.Generator().manual_seed(0), share=1.0))


def test_lattice_scenes_keep_their_captions_with_centres_and_radii_snapped():
    batch = [scenes.make_scene(seed) for seed in range(500)]
    snapped = [snap_to_lattice(scene, 4) for scene in batch]
    moved = [s for s, original in zip(snapped, batch) if s is not original]
    assert len(moved) >= 450  # the rest would break their caption or overlap, and are kept as drawn
    for scene in moved:
        assert scenes.satisfies(scene.spec, scene.objects, scene.background), scene.caption
        assert all(o.x % 4 == o.y % 4 == 0 and o.radius == scenes.SIZES[o.size] for o in scene.objects)
    original = scenes.make_scene(5)
    left = replace(original.objects[0], x=23.5, y=32.0)  # 8.5 px left of the centre; "left" needs more than 8
    edge = replace(original, objects=(left,), spec=scenes.CaptionSpec(
        (scenes.ObjectPhrase(left.shape, left.colour, position="left"),)))
    assert scenes.satisfies(edge.spec, edge.objects, edge.background)
    assert snap_to_lattice(edge, 4) is edge  # column 24 would be only 8 px left: kept as drawn
    _, kept = scene_tensors([0, 1], lattice=0)
    assert [s.objects for s in kept] == [scenes.make_scene(0).objects, scenes.make_scene(1).objects]


def test_anchored_scenes_keep_their_captions_with_every_object_on_an_anchor():
    batch = [scenes.make_scene(seed) for seed in range(2000)]
    placed = [place_on_anchors(scene) for scene in batch]
    assert all(p is not s for p, s in zip(placed, batch))  # every kind of caption has a layout on the anchors
    cells = set()
    for scene in placed:
        assert scenes.satisfies(scene.spec, scene.objects, scene.background), scene.caption
        assert scenes.apart(scene.objects)
        assert all((o.x, o.y) in ANCHORS and o.radius == scenes.SIZES[o.size] for o in scene.objects)
        for phrase, obj in zip(scene.spec.instances(), scene.objects):
            assert phrase.position is None or (obj.x, obj.y) == scenes.POSITIONS[phrase.position]
        cells.update((o.x, o.y) for o in scene.objects)
    assert cells == set(ANCHORS)  # unplaced objects use the corners too
    assert [place_on_anchors(s) for s in batch[:50]] == placed[:50]  # seeded by the scene: reproducible
    _, from_tensors = scene_tensors([7, 8], anchors=True)
    assert from_tensors == placed[7:9]


def test_canonical_layouts_hold_their_captions_and_depend_on_the_caption_alone():
    batch = [scenes.make_scene(seed) for seed in range(3000)]
    laid_out = [canonical_layout(scene) for scene in batch]
    layouts = {}
    for scene in laid_out:
        assert scenes.satisfies(scene.spec, scene.objects, scene.background), scene.caption
        assert scenes.apart(scene.objects), scene.caption
        assert all((o.x, o.y) in ANCHORS and o.radius == scenes.SIZES[o.size] for o in scene.objects)
        spec = scene.spec
        structure = (spec.relation, len(spec.instances()), tuple(p.position for p in spec.phrases))
        layouts.setdefault(structure, set()).add(tuple((o.x, o.y) for o in scene.objects))
    assert all(len(centres) == 1 for centres in layouts.values()), layouts  # one layout per caption structure
    assert {layouts[(r, 2, (None, None))].pop()[0] for r in scenes.RELATIONS} == {
        scenes.POSITIONS[p] for p in ("left", "right", "top", "bottom")}  # the first-named object leads its relation
    assert {k[1] for k in layouts} == {1, 2, 3} and len(layouts) >= 10  # singles, relations, pairs, counts, triples
    _, from_tensors = scene_tensors(list(range(16)), anchors=True, lessons=0.25, canonical=True)
    assert from_tensors[:4] == [lesson_scene(seed) for seed in range(4)]  # lessons are left as they are
    assert from_tensors[4:] == laid_out[4:16]


def test_lesson_scenes_hold_their_captions_on_exact_named_positions_and_fill_their_share():
    lessons = [lesson_scene(seed) for seed in range(1000)]
    for scene in lessons:
        (obj,), (phrase,) = scene.objects, scene.spec.phrases
        assert scenes.satisfies(scene.spec, scene.objects, scene.background), scene.caption
        assert scenes.parse_caption(scene.caption) == scene.spec
        assert (obj.x, obj.y) == scenes.POSITIONS[phrase.position] and obj.radius == scenes.SIZES[obj.size]
    assert {(o.shape, o.size, (o.x, o.y)) for s in lessons for o in s.objects} == {
        (shape, size, xy) for shape in scenes.SHAPES for size in scenes.SIZES for xy in scenes.POSITIONS.values()}
    _, batch = scene_tensors(list(range(16)), lessons=0.25)
    assert batch[:4] == lessons[:4]  # the first round(0.25 * 16) scenes of a batch are lessons, the rest as drawn
    assert batch[4:] == [scenes.make_scene(seed) for seed in range(4, 16)]
    _, snapped = scene_tensors(list(range(16)), lattice=4, anchors=True, lessons=0.25)
    assert snapped[:4] == lessons[:4]  # lessons stay exactly on their named positions (14 is off a 4 px lattice)


def test_scene_kinds_reweight_the_training_captions_and_leave_the_benchmarks_alone():
    assert [scenes.make_scene(seed, None) for seed in range(200)] == [scenes.make_scene(seed) for seed in range(200)]
    assert [scenes.make_scene(seed, dict(scenes.KINDS)) for seed in range(200)] == [
        scenes.make_scene(seed) for seed in range(200)]  # the benchmark's weights draw the benchmark's scenes
    weights = {"relation": 0.6, "triple": 0.4}
    drawn = [scenes.make_scene(seed, weights) for seed in range(2000)]
    kinds = [scene.spec.kind for scene in drawn]
    assert set(kinds) == {"relation", "triple"} and 0.55 < kinds.count("relation") / len(kinds) < 0.65
    assert all(scenes.satisfies(s.spec, s.objects, s.background) for s in drawn)
    _, batch = scene_tensors(list(range(16)), lessons=0.25, canonical=True, kinds=weights)
    assert batch[:4] == [lesson_scene(seed) for seed in range(4)]  # lessons stay single objects
    assert batch[4:] == [canonical_layout(scenes.make_scene(seed, weights)) for seed in range(4, 16)]


def test_scene_kinds_option_parses_kind_weights_and_names_a_bad_one():
    config = TrainShapesConfig(scene_kinds="relation=0.45, pair=0.2,triple=0.15,count=0.1,single=0.1")
    assert config.scene_kinds == {"relation": 0.45, "pair": 0.2, "triple": 0.15, "count": 0.1, "single": 0.1}
    assert TrainShapesConfig(scene_kinds={"pair": 1}).scene_kinds == {"pair": 1.0}  # a YAML mapping
    for bad, names in [("relations=1", "relations"), ("relation=x", "kind=weight"), ("relation=0", ">= 0"),
                       ("pair=-1,single=2", ">= 0")]:
        with pytest.raises(ValueError, match="scene-kinds") as error:
            TrainShapesConfig(scene_kinds=bad)
        assert names in str(error.value)


def test_generator_trains_on_the_scene_kinds_of_its_recipe(tmp_path, monkeypatch):
    tokenizer = write_tokenizer(tmp_path, scenes.vocabulary())
    vq = build_vqvae().eval().requires_grad_(False)
    drawn = []
    make_scene = scenes.make_scene

    def recording_make_scene(seed, kinds=None):
        drawn.append(make_scene(seed, kinds))
        return drawn[-1]

    monkeypatch.setattr(scenes, "make_scene", recording_make_scene)
    train_generator(vq, tokenizer, seed=0, steps=2, sampler_steps=16, batch_size=4, text_steps=0,
                    recipe=Recipe(lessons=0.5, canonical=True, kinds={"triple": 1.0}))
    assert len(drawn) == 4 and {scene.spec.kind for scene in drawn} == {"triple"}  # 2 steps x 2 non-lesson scenes


def test_masking_time_is_that_of_the_fraction_actually_masked():
    tokens = torch.randint(0, 10, (256, 32, 32))
    generator = torch.Generator().manual_seed(0)
    holes = torch.zeros(256, 32, 32, dtype=torch.bool)
    holes[:, 8:20, 8:20] = True
    masked, mask, t = mask_tokens(tokens, 99, generator, holes=holes)
    assert torch.equal(masked == 99, mask) and not (holes & ~mask).any()
    fraction = mask.flatten(1).float().mean(1)
    assert torch.allclose(torch.cos(t * math.pi / 2), fraction, atol=1e-5)
    _, mask, t = mask_tokens(tokens, 99, generator, high_mask_share=1.0)
    assert mask.flatten(1).float().mean(1).min() >= HIGH_MASK_RATE - 1 / 1024
    assert float(schedule_time(1.0)) == 0.0 and abs(float(schedule_time(0.0)) - 1.0) < 1e-6


def test_default_masking_draws_what_meissonic_draws():
    """Without the options, the random stream is Meissonic's (the shipped model's training reproduces)."""
    tokens = torch.randint(0, 10, (8, 32, 32))
    _, mask, t = mask_tokens(tokens, 99, torch.Generator().manual_seed(3))
    reference = torch.Generator().manual_seed(3)
    expected_t = torch.rand(8, generator=reference)
    count = (1024 * torch.cos(expected_t * math.pi / 2)).round().clamp(min=1)
    assert torch.equal(t, expected_t) and torch.equal(mask.flatten(1).sum(1), count.long())


def test_frozen_text_encoder_stays_as_pretrained(tmp_path):
    tokenizer = write_tokenizer(tmp_path, scenes.vocabulary())
    torch.manual_seed(0)
    vq = build_vqvae().eval().requires_grad_(False)
    seen = {}

    def snapshot(done, transformer, text_encoder):
        seen.setdefault("first", {k: v.clone() for k, v in text_encoder.state_dict().items()})

    run = train_generator(vq, tokenizer, seed=0, steps=3, sampler_steps=16, batch_size=4, text_steps=2,
                          recipe=Recipe(text_lr_scale=0.0, hole_share=0.5, high_mask_share=0.5), on_models=snapshot)
    assert run.steps_done == 3
    after = run.text_encoder.state_dict()
    assert all(torch.equal(seen["first"][k], after[k]) for k in after)  # joint steps left it alone


def test_silhouette_maps_label_each_pixel_with_the_shape_that_covers_it():
    batch = [scenes.make_scene(seed) for seed in range(100)]
    maps = silhouette_maps(batch)
    assert maps.shape == (100, scenes.SIZE, scenes.SIZE) and int(maps.max()) <= len(scenes.SHAPES)
    for scene, labels in zip(batch, maps):
        pixels = np.asarray(scenes.render(scene)).astype(int)
        drawn = np.abs(pixels - np.array(scenes.BACKGROUNDS[scene.background])).sum(-1) > 100
        assert ((labels > 0).numpy() == drawn).mean() > 0.98, scene.caption  # only anti-aliased edges differ
        for obj in scene.objects:
            assert int(labels[int(obj.y), int(obj.x)]) == 1 + scenes.SHAPES.index(obj.shape), scene.caption


def test_silhouette_target_trains_the_transformer_and_leaves_no_hook(tmp_path):
    tokenizer = write_tokenizer(tmp_path, scenes.vocabulary())
    torch.manual_seed(0)
    vq = build_vqvae().eval().requires_grad_(False)
    runs = {}
    for weight in (0.0, 1.0):
        losses = []
        run = train_generator(vq, tokenizer, seed=0, steps=2, sampler_steps=16, batch_size=4, text_steps=0,
                              recipe=Recipe(hole_share=0.5, silhouette=weight),
                              on_step=lambda step, loss, seen=losses: seen.append(loss))
        runs[weight] = (run.transformer, losses)
    (plain, plain_losses), (with_head, head_losses) = runs[0.0], runs[1.0]
    assert head_losses[0] > plain_losses[0] + 0.5  # the first step adds ~ln 6 nats per pixel of silhouette loss
    changed = [name for name, p in with_head.state_dict().items() if not torch.equal(p, plain.state_dict()[name])]
    assert "transformer_blocks.0.attn.to_q.weight" in changed  # its gradient reaches the blocks
    assert not with_head.mlm_layer._forward_pre_hooks  # the head is gone: the model is the plain transformer


def test_probe_helpers_describe_the_scene():
    scene = probes.single_object_scenes(1, start=5000)[0]
    other = probes.other_shape(scene)
    swapped = probes.with_shape(scene, other)
    assert other != scene.objects[0].shape and swapped.objects[0].shape == other
    assert scenes.parse_caption(swapped.caption).phrases[0].shape == other
    assert scenes.parse_caption(scene.caption).phrases[0].shape == scene.objects[0].shape
    assert not (_object_cells(scene, 32) & ~probes.hole_mask(scene, 32)).any()
    table = probes.confusion(["circle", "circle", "square"], ["circle", probes.NONE, "square"])
    assert table["circle"] == {**dict.fromkeys(scenes.SHAPES, 0), probes.NONE: 1, "circle": 1}
    assert probes.accuracy(["circle", "square"], ["circle", "cross"]) == 0.5


def test_single_shape_reader_names_rendered_objects_and_takes_an_empty_batch():
    from shapes.scorer import ShapesScorer

    scorer, batch = ShapesScorer(device="cpu"), probes.single_object_scenes(10, start=5000)
    read = probes.read_single_shapes(scorer, [scenes.render(s) for s in batch])
    assert probes.accuracy([s.objects[0].shape for s in batch], read) >= 0.9
    # a batch of measured captions may hold no single object (shapes_model.py asks for each batch)
    assert probes.read_single_shapes(scorer, []) == []


@pytest.fixture(scope="module")
def shipped():
    return mgt.load_pipeline("shapes-meissonic", device="cpu")


def test_shape_swap_gap_measures_the_object_tokens(shipped):
    batch = probes.single_object_scenes(8, start=5000)
    encode = shipped.conditioner.encode
    every = probes.shape_swap_gap(shipped.transformer, encode, shipped.vqvae, batch, shipped.defaults.steps)
    hole = probes.shape_swap_gap(shipped.transformer, encode, shipped.vqvae, batch, shipped.defaults.steps, hole=True)
    for figures in (every, hole):
        assert figures["tokens"] > 0 and math.isfinite(figures["gap"])
        assert abs(figures["gap"] - (figures["swapped"] - figures["true"])) < 1e-9
    # the same caption on both sides gives no gap: what the probe differs in is the caption alone
    same = probes.shape_swap_gap(shipped.transformer, lambda c: encode([s.caption for s in batch]), shipped.vqvae,
                                 batch, shipped.defaults.steps)
    assert same["gap"] == 0.0


def test_encoder_probe_reads_shape_only_where_the_caption_says_it(tmp_path):
    from shapes.training.caption_encoder import pretrain_text_encoder
    from shapes.training.generator import TEXT_LENGTH, encode_text

    tokenizer = write_tokenizer(tmp_path, scenes.vocabulary())
    torch.manual_seed(0)
    encoder = build_text_encoder(tokenizer, projection_dim=32).eval()
    pretrain_text_encoder(tokenizer, encoder, seed=0, steps=150, max_length=TEXT_LENGTH)
    trained = probes.encoder_shape_probe(lambda c: encode_text(tokenizer, encoder, c), train=300, test=200)

    def without_shape(captions):  # every shape word made "circle": nothing left to read
        for shape in scenes.SHAPES[1:]:
            captions = [c.replace(scenes.PLURALS[shape], "circles").replace(shape, "circle") for c in captions]
        return encode_text(tokenizer, encoder, captions)

    blind = probes.encoder_shape_probe(without_shape, train=300, test=200)
    assert trained >= 0.95 and blind <= 0.4, (trained, blind)  # chance is 0.2
