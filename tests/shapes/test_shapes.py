"""The shapes benchmark: scenes, the shipped ``shapes-meissonic`` model, the ``shapes`` scorer, and training."""

import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mgt
from actors.scoring.registry import build_scorer
from jobs.cli import main
from mgt.hub.loading import resolve_model_path
from mgt.models.tiny import write_tokenizer
from shapes import scenes
from shapes.scorer import ShapesScorer, caption_factors, held_out_accuracy
from shapes.training import probes
from shapes.training.caption_encoder import IGNORE, caption_targets, head_sizes, pretrain_text_encoder
from shapes.training.config import TrainShapesConfig
from shapes.training.data import canonical_layout, render_tensors, scene_tensors, training_seeds
from shapes.training.generator import (
    MICRO_CONDS,
    TEXT_LENGTH,
    TEXT_WIDTH,
    Architecture,
    build_text_encoder,
    build_transformer,
    grow_transformer,
)
from shapes.training.shapes import model_defaults, train_model, train_scorer
from shapes.training.vq import LATENT_CHANNELS, LEVELS, build_vqvae, encode_tokens, reconstruct, reconstruction_psnr

PSNR_THRESHOLD_DB = 30.0  # the shipped VQ measures 33.3 dB on 256 held-out scenes
RECONSTRUCTION_SCORE = 0.8  # shapes score of the shipped VQ's round trips of held-out scenes, at least
# (measured 0.85 on 128 scenes; the scenes themselves: 0.89)
TEXT_PRETRAIN_STEPS, TEXT_PRETRAIN_ACCURACY = 150, 0.8  # held-out accuracy of the caption heads (measured 0.95;
# untrained: 0.16)
SCORE_MARGIN = 0.4  # shipped model's mean shapes score minus the random-weight model's, at least
TARGET_MEAN, TARGET_SINGLE, TARGET_SHAPE_ACCURACY = 0.6, 0.8, 0.9  # issue 25, on the evaluation captions
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CAPTION_NATS = 0.5  # object-token cross-entropy with every token masked: the empty caption costs at least this
# (measured 3.11 against 1.17 with the caption)
ENCODER_SHAPE_PROBE = 0.95  # held-out linear-probe accuracy of the shipped text encoder (measured 1.00)
SHAPE_WORD_NATS = 0.15  # shape-specific tokens: a caption with another shape word costs at least this
# (shapes.training.probes.shape_swap_gap; measured 3.51 on 64 scenes)


@pytest.fixture(scope="module")
def scorer():
    return ShapesScorer()


def test_scenes_are_deterministic_and_captions_read_back():
    first, again = scenes.render_batch(range(40)), scenes.render_batch(range(40))
    assert np.array_equal(first[0], again[0]) and first[1] == again[1]
    assert len({s.caption for s in first[1]}) > 30  # seeds give different scenes
    for scene in first[1] + scenes.render_batch(scenes.held_out_seeds(200))[1]:
        assert 1 <= len(scene.objects) <= 3
        assert scenes.parse_caption(scene.caption) == scene.spec
        assert scenes.satisfies(scene.spec, scene.objects, scene.background)
        rng = random.Random(scene.seed)
        negative = scenes.perturb(scene, rng)
        assert not scenes.satisfies(negative, scene.objects, scene.background)
        assert scenes.parse_caption(scenes.write_caption(negative, rng)) == negative


def test_training_never_sees_held_out_scenes():
    seeds = training_seeds(run_seed=10**6, step=10**7, batch_size=64, part=2)
    assert max(seeds) < scenes.HELD_OUT_START <= min(scenes.held_out_seeds(5))


def test_caption_grammar_errors_name_the_forms():
    spec = scenes.parse_caption("A red circle above a blue square.")
    assert spec.relation == "above" and [p.colour for p in spec.phrases] == ["red", "blue"]
    with pytest.raises(ValueError, match="not in the shapes grammar.*a red circle above a blue square"):
        scenes.parse_caption("a photo of an astronaut riding a horse")


def test_every_caption_word_is_one_token(tmp_path):
    tokenizer = write_tokenizer(tmp_path, scenes.vocabulary())
    assert [w for w in scenes.vocabulary() if len(tokenizer.tokenize(w)) != 1] == []


def test_grid_codebook_lookup_is_per_channel_rounding():
    """The VQ trains with diffusers' nearest-code lookup on the fixed grid; that must equal rounding each
    latent channel to the nearest level, clamped to the grid, so every code stays reachable."""
    vq = build_vqvae(channels=(8, 8))
    latents = 3 * torch.randn(2, LATENT_CHANNELS, 5, 5, generator=torch.Generator().manual_seed(0))
    quantized, _, (_, _, indices) = vq.quantize(latents)
    assert torch.equal(quantized, latents.round().clamp(min(LEVELS), max(LEVELS)))
    assert torch.equal(vq.quantize.embedding.weight[indices], quantized.permute(0, 2, 3, 1).reshape(-1, LATENT_CHANNELS))
    assert vq.config.num_vq_embeddings == len(LEVELS) ** LATENT_CHANNELS
    assert not vq.quantize.embedding.weight.requires_grad


def test_shipped_vq_round_trip_psnr():
    vqvae = mgt.load_pipeline("shapes-meissonic", device="cpu").vqvae
    psnr = reconstruction_psnr(vqvae, scenes.held_out_seeds(64, start=5000))
    assert psnr > PSNR_THRESHOLD_DB


@pytest.fixture(scope="module")
def vq_round_trips() -> tuple[list[Image.Image], list[scenes.Scene]]:
    """The shipped VQ's encode -> decode pictures of 64 held-out scenes, with the scenes."""
    vqvae = mgt.load_pipeline("shapes-meissonic", device="cpu").vqvae
    images, batch = scene_tensors(scenes.held_out_seeds(64, start=9000))
    pictures = [Image.fromarray(im) for im in (reconstruct(vqvae, images) * 255).round().byte().permute(0, 2, 3, 1).numpy()]
    return pictures, batch


def test_shipped_vq_keeps_what_the_scorer_reads(scorer, vq_round_trips):
    """PSNR alone hid blobs (a VQ at 24 dB whose round trips scored 0.11): the scorer must still read the
    caption off the VQ's reconstructions of held-out scenes, else no generator through it can draw shapes."""
    pictures, batch = vq_round_trips
    assert np.mean(scorer.score(pictures, [s.caption for s in batch])) >= RECONSTRUCTION_SCORE


def test_stray_pixels_count_specks_not_objects_nor_the_decoder_frame():
    clean = [scenes.render(scenes.make_scene(s)) for s in scenes.held_out_seeds(32, start=9000)]
    assert [probes.stray_pixels(im) for im in clean] == [0] * 32
    pixels = np.asarray(clean[0]).copy()
    background = pixels[1, 1].copy()
    far = [(r, c) for r in range(3, 60, 4) for c in range(3, 60, 4)
           if (np.abs(pixels[r - 3:r + 4, c - 3:c + 4].astype(int) - background).sum(-1) == 0).all()]
    (r1, c1), (r2, c2) = far[0], far[-1]
    pixels[r1:r1 + 2, c1:c1 + 2] = (230, 120, 200)  # a 2x2 pink speck
    pixels[r2, c2] = (230, 120, 200)                # and a single pixel
    pixels[0, 30:32] = (230, 120, 200)              # the outermost frame (the decoder smears it) is left out
    assert probes.stray_pixels(Image.fromarray(pixels)) == 5


def test_shipped_vq_round_trip_draws_no_specks(vq_round_trips):
    """Specks in generated images come from the sampler, not the decoder: round trips of rendered scenes have
    almost none (0.13 pixels per image on the 300 evaluation scenes, against 6.55 per vanilla generation on the
    tuning captions, docs/samplers.md §2)."""
    pictures, _ = vq_round_trips
    assert np.mean([probes.stray_pixels(im) for im in pictures]) < 1.0


def test_scorer_held_out_accuracy(scorer):
    report = held_out_accuracy(scorer, count=300, seed=1)
    assert report["accuracy"] >= 0.95, report
    assert report["mean_score_positive"] > 0.8 > 0.2 > report["mean_score_negative"]


def test_score_factors_multiply_to_the_score_and_name_what_an_image_fails(scorer):
    scene = next(s for s in map(scenes.make_scene, scenes.held_out_seeds(200, start=9000)) if s.spec.relation)
    image = scenes.render(scene)
    spec = scene.spec
    swapped = scenes.CaptionSpec((scenes.ObjectPhrase(scenes.SHAPES[(scenes.SHAPES.index(spec.phrases[0].shape) + 1)
                                                                    % len(scenes.SHAPES)], spec.phrases[0].colour),
                                  spec.phrases[1]), spec.relation, spec.background)
    reversed_relation = scenes.CaptionSpec(spec.phrases[::-1], spec.relation, spec.background)
    detections = scorer.detect([image])
    true, wrong_shape, wrong_relation = (caption_factors(s, detections, 0) for s in (spec, swapped, reversed_relation))
    assert scorer.score([image], [scene.caption]) == [pytest.approx(true.score, abs=1e-12)]
    assert min(true) > 0.5  # a rendered scene passes every factor of its own caption
    assert wrong_shape.shape < 0.5 < min(wrong_shape.colour, wrong_shape.relation, wrong_shape.count)
    assert wrong_relation.relation < 0.5 < min(wrong_relation.shape, wrong_relation.colour)


def test_shapes_scorer_is_registered_and_rejects_foreign_prompts():
    scorer = build_scorer("shapes", batch_size=2)
    image = scenes.render(scenes.make_scene(7))
    good, bad = scorer.score([image, image], [scenes.make_scene(7).caption, scenes.make_scene(8).caption])
    assert good > 0.5 > bad
    with pytest.raises(ValueError, match="shapes grammar"):
        scorer.score([image], ["a watercolour of a fox"])


def test_shipped_model_matches_prompts_far_better_than_random_weights(scorer):
    prompts = [scenes.make_scene(seed).caption for seed in scenes.held_out_seeds(24, start=9000)]
    seeds = list(range(len(prompts)))
    means = {}
    for name in ("shapes-meissonic", "tiny-meissonic"):
        out = mgt.load_pipeline(name, device="cpu").generate(prompts, seeds)
        means[name] = float(np.mean(scorer.score([Image.fromarray(im) for im in out.images], prompts)))
    assert means["shapes-meissonic"] - means["tiny-meissonic"] >= SCORE_MARGIN, means


def test_shipped_model_meets_the_targets_on_the_evaluation_captions(scorer):
    """Issue 25's targets, on the first 96 of the 300 evaluation captions at seed 0 (all 300 take minutes; the
    shipped model: 0.701, 0.918 and 100 % here, 0.667, 0.907 and 97 % on all 300 at seed 0)."""
    lines = (EXAMPLES / "shapes_heldout.jsonl").read_text().splitlines()[:96]
    prompts = [json.loads(line)["prompt"] for line in lines]
    images = [Image.fromarray(im) for im in mgt.load_pipeline("shapes-meissonic", device="cpu").generate(
        prompts, [0] * len(prompts)).images]
    scores = np.array(scorer.score(images, prompts))
    singles = [i for i, prompt in enumerate(prompts) if scenes.parse_caption(prompt).kind == "single"]
    read = probes.read_single_shapes(scorer, [images[i] for i in singles])
    truth = [scenes.parse_caption(prompts[i]).phrases[0].shape for i in singles]
    figures = {"mean": scores.mean(), "single": scores[singles].mean(), "shape_accuracy": probes.accuracy(truth, read)}
    assert figures["mean"] >= TARGET_MEAN and figures["single"] >= TARGET_SINGLE, figures
    assert figures["shape_accuracy"] >= TARGET_SHAPE_ACCURACY, figures


@pytest.fixture(scope="module")
def single_object_scenes():
    """The shipped model and 64 held-out single-object scenes with their tokens, loaded and encoded once.

    The scenes are in the canonical layout the shipped model was trained on last (``--canonical``: the object
    in the center unless the caption positions it): with every token masked it predicts its object there, so
    on an object the caption allows elsewhere the caption would seem not to count (measured on the ninth stage:
    3.23 against 3.26 nats with the empty caption, against 1.17 and 3.11 in the canonical layout)."""
    pipe = mgt.load_pipeline("shapes-meissonic", device="cpu")
    batch = [canonical_layout(scene) for scene in probes.single_object_scenes(64, start=5000)]
    with torch.no_grad():
        return pipe, batch, encode_tokens(pipe.vqvae, render_tensors(batch))


def _all_masked_object_loss(single_object_scenes, captions_of: Callable[[scenes.Scene], str]) -> float:
    """The shipped model's cross-entropy on the scenes' object tokens at the first sampling step (every token
    masked), conditioned on ``captions_of(scene)``."""
    pipe, batch, tokens = single_object_scenes
    with torch.no_grad():
        objects = tokens != torch.mode(tokens.flatten(1), dim=1).values[:, None, None]
        hidden, pooled = pipe.conditioner.encode([captions_of(scene) for scene in batch])
        logits = pipe.transformer(torch.full_like(tokens, pipe.transformer.mask_token_id), hidden, pooled,
                                  torch.tensor([MICRO_CONDS] * len(batch)), torch.tensor([pipe.defaults.steps - 1]))
        return torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[objects], tokens[objects]).item()


def test_shipped_model_reads_the_caption(single_object_scenes):
    caption = _all_masked_object_loss(single_object_scenes, lambda s: s.caption)
    empty = _all_masked_object_loss(single_object_scenes, lambda s: "")
    assert empty - caption >= CAPTION_NATS, (caption, empty)


def test_shipped_model_reads_the_shape_word(single_object_scenes):
    """With every token masked, a caption naming another shape makes the true tokens less likely where the two
    shapes' renders differ (the first model, trained without object holes and a frozen encoder: 0.03 nats)."""
    pipe, batch, _ = single_object_scenes
    gap = probes.shape_swap_gap(pipe.transformer, pipe.conditioner.encode, pipe.vqvae, batch, pipe.defaults.steps)
    assert gap["gap"] >= SHAPE_WORD_NATS, gap


def test_shipped_text_encoder_keeps_the_shape_word(single_object_scenes):
    """Frozen after its caption pre-training, the encoder keeps what it learnt: a linear probe on its pooled
    embedding reads the shape of one-object captions (the first model's jointly trained encoder: 0.35)."""
    pipe = single_object_scenes[0]
    assert probes.encoder_shape_probe(pipe.conditioner.encode) >= ENCODER_SHAPE_PROBE


def test_caption_targets_name_what_the_caption_asks_for():
    spec = scenes.parse_caption("two large red squares on a black background")
    targets = caption_targets(spec)
    assert len(targets) == len(head_sizes()) == 3 + 3 * 4
    background, count, relation = targets[:3]
    assert (background, count, relation) == (1 + list(scenes.BACKGROUNDS).index("black"), 1, 0)
    square, red, large = scenes.SHAPES.index("square"), list(scenes.COLOURS).index("red"), 1 + 1
    assert targets[3:7] == targets[7:11] == [square, red, large, 0] and targets[11:] == [IGNORE] * 4
    assert all(t == IGNORE or 0 <= t < n for t, n in zip(targets, head_sizes()))


def test_text_pretraining_learns_the_caption_grammar(tmp_path):
    tokenizer = write_tokenizer(tmp_path, scenes.vocabulary())
    torch.manual_seed(0)
    encoder = build_text_encoder(tokenizer, projection_dim=32)
    accuracy = pretrain_text_encoder(tokenizer, encoder, seed=0, steps=TEXT_PRETRAIN_STEPS, max_length=TEXT_LENGTH)
    assert accuracy >= TEXT_PRETRAIN_ACCURACY  # 1000 steps (the default) reach 1.0 on the 512 held-out captions


def test_shipped_model_resolves_inside_the_package():
    folder = resolve_model_path("shapes-meissonic")
    assert folder.parent.name == "assets" and folder.parent.parent.name == "shapes"
    defaults = json.loads((folder / "model_index.json").read_text())["_maskray_defaults"]
    assert defaults["width"] == defaults["height"] == 64 and defaults["negative_prompt"] == ""
    assert defaults == model_defaults(TrainShapesConfig())  # train-shapes' defaults write the shipped ones


def test_short_training_run_end_to_end(tmp_path):
    config = TrainShapesConfig(vq_steps=2, text_steps=2, steps=2, batch_size=4, scorer_steps=2, shape_steps=2)
    report = train_model(config, tmp_path / "model")
    assert report["generator_steps_done"] == 2 and report["vq"]["vq_steps"] == 2
    pipe = mgt.load_pipeline(str(tmp_path / "model"), device="cpu")
    out = pipe.generate(["a red circle above a blue square"], [0], steps=2)
    assert out.images.shape == (1, 64, 64, 3)
    train_scorer(config, tmp_path / "scorer")
    score = ShapesScorer(checkpoint=tmp_path / "scorer").score([Image.fromarray(out.images[0])],
                                                             ["a red circle above a blue square"])
    assert 0.0 <= score[0] <= 1.0


def test_train_shapes_command_resumes_after_the_vq_stage(tmp_path, capsys):
    args = ["train-shapes", "--out", str(tmp_path), "--vq-steps", "1", "--text-steps", "1", "--steps", "1",
            "--batch-size", "2"]
    assert main(args) == 0
    vq_weights = (tmp_path / "vqvae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main([*args[:-4], "--steps", "2", "--batch-size", "2"]) == 0
    assert (tmp_path / "vqvae" / "diffusion_pytorch_model.safetensors").read_bytes() == vq_weights
    assert json.loads((tmp_path / "training.json").read_text())["generator_steps_done"] == 2
    assert '"vq_psnr_db"' in capsys.readouterr().out


def test_train_shapes_builds_the_transformer_size_it_is_given(tmp_path, capsys):
    assert main(["train-shapes", "--out", str(tmp_path), "--vq-steps", "1", "--text-steps", "1", "--steps", "1",
                 "--batch-size", "2", "--width", "48", "--heads", "3", "--layers", "2", "--single-layers", "1"]) == 0
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert (config["num_attention_heads"], config["attention_head_dim"], config["pooled_projection_dim"]) == (3, 16, 48)
    assert (config["num_layers"], config["num_single_layers"]) == (2, 1)
    assert mgt.load_pipeline(str(tmp_path), device="cpu").generate(["a red circle"], [0], steps=2).images.shape == (1, 64, 64, 3)
    assert main(["train-shapes", "--out", str(tmp_path / "x"), "--width", "100", "--heads", "3"]) == 2
    assert "--width 100" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["train-shapes", "--out", str(tmp_path / "x"), "--width", "16", "--heads", "2"]) == 2  # 8 per head:
    assert "multiple of 16 channels each; e.g. --width 32" in capsys.readouterr().err  # odd rotary axes


def test_train_shapes_continues_a_trained_model(tmp_path, monkeypatch, capsys):
    """--init-from: a fine-tune stage starts from the model's weights, keeps its VQ and reads the scenes after
    every step of its history, so two chained stages never see a scene twice."""
    first = tmp_path / "first"
    assert main(["train-shapes", "--out", str(first), "--vq-steps", "1", "--text-steps", "1", "--steps", "2",
                 "--batch-size", "2"]) == 0
    seen_steps = []
    real_seeds = training_seeds

    def recording_seeds(run_seed, step, batch_size, part=0):
        seen_steps.append(step)
        return real_seeds(run_seed, step, batch_size, part)

    monkeypatch.setattr("shapes.training.generator.training_seeds", recording_seeds)
    stages = [tmp_path / "second", tmp_path / "third"]
    for init, out in zip([first, stages[0]], stages):
        assert main(["train-shapes", "--out", str(out), "--init-from", str(init), "--steps", "3",
                     "--batch-size", "2", "--lr", "1e-2"]) == 0
    assert seen_steps == [2, 3, 4, 5, 6, 7]
    record = json.loads((stages[1] / "training.json").read_text())
    assert (record["first_step"], record["init"]["first_step"], record["init"]["init"]["generator_steps_done"]) == (5, 2, 2)
    vq = "vqvae/diffusion_pytorch_model.safetensors"
    assert (stages[1] / vq).read_bytes() == (first / vq).read_bytes()
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (stages[0] / weights).read_bytes() != (first / weights).read_bytes()
    assert main(["train-shapes", "--out", str(tmp_path / "x"), "--init-from", str(tmp_path / "missing")]) == 2
    assert "--init-from" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_train_shapes_continues_the_shipped_model_by_its_registered_name(tmp_path):
    """--init-from shapes-meissonic continues the shipped model (its folder in the package)."""
    from mgt.hub.loading import resolve_model_path

    shipped = resolve_model_path("shapes-meissonic")
    out = tmp_path / "stage"
    assert main(["train-shapes", "--out", str(out), "--init-from", "shapes-meissonic", "--steps", "1",
                 "--batch-size", "2"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["init"] == json.loads((shipped / "training.json").read_text())
    vq = "vqvae/diffusion_pytorch_model.safetensors"
    assert (out / vq).read_bytes() == (shipped / vq).read_bytes()


def test_a_grown_transformer_starts_as_the_trained_one():
    """Blocks appended by --init-from with more --layers start as the identity (adaLN-Zero): the grown model
    predicts exactly what the trained one did, and the new blocks still receive gradients."""
    torch.manual_seed(0)
    small = build_transformer(15, Architecture(32, 2, 1, 1)).eval()
    grown = grow_transformer(small, 2, 3, seed=1).eval()
    assert (grown.config.num_layers, grown.config.num_single_layers) == (2, 3)
    inputs = (torch.randint(0, 16, (2, 8, 8)), torch.randn(2, TEXT_LENGTH, TEXT_WIDTH), torch.randn(2, 32),
              torch.rand(2, 5), torch.tensor([3]))
    with torch.no_grad():
        assert torch.equal(grown(*inputs), small(*inputs))
    grown(*inputs).square().mean().backward()
    for norm in (grown.transformer_blocks[1].norm1, grown.single_transformer_blocks[2].norm):
        assert norm.linear.weight.grad.abs().sum() > 0
    assert grow_transformer(small, 1, 1) is small
    with pytest.raises(ValueError, match="--layers 0 --single-layers 1: .* 1 joint and 1 single-stream"):
        grow_transformer(small, 0, 1)


def test_train_shapes_grows_a_trained_model(tmp_path, capsys):
    first = tmp_path / "first"
    args = ["train-shapes", "--vq-steps", "1", "--text-steps", "1", "--steps", "1", "--batch-size", "2"]
    assert main([*args, "--out", str(first), "--width", "32", "--heads", "2"]) == 0
    assert main([*args, "--out", str(tmp_path / "grown"), "--init-from", str(first), "--width", "32", "--heads",
                 "2", "--layers", "2"]) == 0
    config = json.loads((tmp_path / "grown" / "transformer" / "config.json").read_text())
    assert (config["num_layers"], config["num_single_layers"], config["pooled_projection_dim"]) == (2, 2, 32)
    assert json.loads((tmp_path / "grown" / "training.json").read_text())["config"]["layers"] == 2
    assert main([*args, "--out", str(tmp_path / "x"), "--init-from", str(first)]) == 2
    assert "--width 128 --heads 4: the transformer in" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_train_shapes_help_loads_no_torch():
    import subprocess
    import sys

    code = ("import sys, contextlib, io\nfrom jobs.cli import main\nwith contextlib.redirect_stdout(io.StringIO()) as f:\n"
            "    try: main(['train-shapes', '--help'])\n    except SystemExit: pass\n"
            "print('torch' in sys.modules, '--scorer-steps' in f.getvalue(), '--minutes' in f.getvalue())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True", "True"]
