"""Scorers: HPS v2 parity with the hpsv2 reference fixture, input handling, loading errors, CLIPScore, registry."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import fsspec  # noqa: E402
import huggingface_hub.constants  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from actors.scoring.clip_score import CLIPScorer  # noqa: E402
from actors.scoring.hps import HPSv2Scorer, preprocess  # noqa: E402
from actors.scoring.registry import (  # noqa: E402
    ScorerConfig,
    build_scorer,
    build_scorer_from_config,
    register_scorer,
    scorer_names,
)

HPS_TINY = Path(__file__).resolve().parent / "fixtures" / "hps-tiny"
CHECKPOINT = HPS_TINY / "hps_tiny_checkpoint.pt"
MODEL_CONFIG = HPS_TINY / "model_config.json"
ATOL = 1e-4


# ---------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return json.loads((HPS_TINY / "expected_scores.json").read_text())


def load_pairs(rows: list[dict]) -> tuple[list[Image.Image], list[str], list[float]]:
    images = [Image.open(HPS_TINY / row["image"]) for row in rows]
    return images, [row["prompt"] for row in rows], [row["hps"] for row in rows]


def is_square(row: dict) -> bool:
    with Image.open(HPS_TINY / row["image"]) as image:
        return image.width == image.height


@pytest.fixture(scope="module")
def hps() -> HPSv2Scorer:
    return HPSv2Scorer(CHECKPOINT, model=MODEL_CONFIG, device="cpu")


@pytest.fixture(scope="module")
def model_cfg() -> dict:
    return json.loads(MODEL_CONFIG.read_text())["model_cfg"]


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return torch.load(CHECKPOINT, map_location="cpu", weights_only=True)["state_dict"]


def odd_images() -> list[Image.Image]:
    """Modes and sizes the pipeline may meet: alpha, grayscale, palette, tiny, extreme and exact sizes."""
    rgba = Image.new("RGBA", (40, 24), (200, 30, 60, 100))
    return [
        rgba,
        Image.new("L", (33, 77), 128),
        Image.new("LA", (17, 5), (90, 255)),
        Image.new("RGB", (50, 50), (10, 200, 30)).convert("P"),
        Image.new("RGB", (1, 1), (255, 255, 255)),
        Image.new("RGB", (1, 300), (0, 0, 255)),
        Image.new("RGB", (32, 10), (5, 5, 5)),  # longer side already the model size: still padded
        Image.new("RGB", (31, 7), (77, 66, 55)),
    ]


# ---------------------------------------------------------------------------------------------------
# HPS v2: parity with the reference


def test_hps_square_rows_match_reference(hps, rows):
    square = [row for row in rows if is_square(row)]
    assert square, "the fixture should hold at least one square image"
    images, prompts, expected = load_pairs(square)
    assert hps.score(images, prompts) == pytest.approx(expected, abs=ATOL)


def test_hps_non_square_rows_match_reference_with_hpsv2_padding(hps, rows):
    non_square = [row for row in rows if not is_square(row)]
    assert non_square, "the fixture should hold non-square images: they pin the resize-and-pad transform"
    images, prompts, expected = load_pairs(non_square)
    assert hps.score(images, prompts) == pytest.approx(expected, abs=ATOL)


def test_crop_preprocessing_agrees_on_square_rows_only(rows):
    # Resize-and-crop sees the same pixels as resize-and-pad on a square image and different ones
    # otherwise: the fixture's non-square rows tell the two transforms apart.
    scorer = HPSv2Scorer(CHECKPOINT, model=MODEL_CONFIG, device="cpu", resize_mode="crop")
    images, prompts, expected = load_pairs(rows)
    for row, score, reference in zip(rows, scorer.score(images, prompts), expected):
        if is_square(row):
            assert score == pytest.approx(reference, abs=ATOL), row
        else:
            assert abs(score - reference) > 100 * ATOL, row


def test_pad_preprocessing_follows_hpsv2_resize_max_size():
    # 48 wide x 80 high at size 32: scale 0.4 -> 32 x 19, pad_w = 13 split as 6 left / 7 right.
    pixels = preprocess(Image.new("RGB", (48, 80), (255, 255, 255)), 32)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    raw = pixels * std + mean
    assert pixels.shape == (3, 32, 32)
    assert torch.allclose(raw[:, :, :6], torch.zeros(()), atol=1e-6)
    assert torch.allclose(raw[:, :, 25:], torch.zeros(()), atol=1e-6)
    assert torch.allclose(raw[:, :, 7:24], torch.ones(()), atol=1e-5)


def test_hps_batch_matches_one_at_a_time(hps, rows):
    images, prompts, _ = load_pairs(rows[1::2])  # every image, each prompt, both square and not
    together = hps.score(images, prompts)
    alone = [hps.score([image], [prompt])[0] for image, prompt in zip(images, prompts)]
    chunked = HPSv2Scorer(CHECKPOINT, model=MODEL_CONFIG, device="cpu", batch_size=3).score(images, prompts)
    assert alone == pytest.approx(together, abs=1e-6)
    assert chunked == pytest.approx(together, abs=1e-6)


def test_hps_handles_odd_modes_and_sizes(hps):
    images = odd_images()
    scores = hps.score(images, ["a photo of a cat"] * len(images))
    assert len(scores) == len(images) and all(math.isfinite(score) for score in scores)


def test_hps_drops_alpha(hps):
    rgba = Image.new("RGBA", (40, 24), (200, 30, 60, 100))
    rgb = Image.new("RGB", (40, 24), (200, 30, 60))
    assert hps.score([rgba], ["red"]) == pytest.approx(hps.score([rgb], ["red"]), abs=1e-7)


def test_hps_empty_input_gives_no_scores(hps):
    assert hps.score([], []) == []


# ---------------------------------------------------------------------------------------------------
# HPS v2: model and checkpoint sources


def test_hps_accepts_cfg_dict_and_bare_state_dict(tmp_path, hps, model_cfg, state_dict, rows):
    bare = tmp_path / "bare.pt"
    torch.save(state_dict, bare)
    scorer = HPSv2Scorer(bare, model=model_cfg, device="cpu")
    images, prompts, _ = load_pairs(rows[:3])
    assert scorer.score(images, prompts) == pytest.approx(hps.score(images, prompts), abs=1e-7)


def test_hps_object_store_checkpoint_is_fetched_once(tmp_path, hps, rows):
    uri = "memory://maskray-test-bucket/hps/hps_tiny_checkpoint.pt"
    memory = fsspec.filesystem("memory")
    memory.pipe(uri, CHECKPOINT.read_bytes())
    first = HPSv2Scorer(uri, model=MODEL_CONFIG, device="cpu", cache_dir=tmp_path)
    memory.rm(uri)  # a second build must not need the object store any more
    second = HPSv2Scorer(uri, model=MODEL_CONFIG, device="cpu", cache_dir=tmp_path)
    assert first.checkpoint_path == second.checkpoint_path
    assert first.checkpoint_path.is_relative_to(tmp_path)
    images, prompts, _ = load_pairs(rows[:2])
    assert second.score(images, prompts) == pytest.approx(hps.score(images, prompts), abs=1e-7)


def test_hps_missing_object_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="memory://maskray-test-bucket/absent.pt"):
        HPSv2Scorer("memory://maskray-test-bucket/absent.pt", model=MODEL_CONFIG, device="cpu", cache_dir=tmp_path)


def fake_hub_cache(root: Path, repo_id: str, filename: str) -> None:
    """The layout hf_hub_download reads offline: refs/main names a snapshot holding the file."""
    commit = "0" * 40
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / filename).write_bytes(CHECKPOINT.read_bytes())


@pytest.fixture
def offline_hub(monkeypatch):
    # The constant is read once at import; pin it in case something imported the hub before this module.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hps_hub_checkpoint_chosen_by_version(tmp_path, offline_hub):
    fake_hub_cache(tmp_path, "xswu/HPSv2", "HPS_v2.1_compressed.pt")
    scorer = HPSv2Scorer("xswu/HPSv2", model=MODEL_CONFIG, version="v2.1", device="cpu", cache_dir=tmp_path)
    assert scorer.checkpoint_path.name == "HPS_v2.1_compressed.pt"
    explicit = HPSv2Scorer("hf://xswu/HPSv2/HPS_v2.1_compressed.pt", model=MODEL_CONFIG, cache_dir=tmp_path)
    assert explicit.checkpoint_path == scorer.checkpoint_path
    with pytest.raises(FileNotFoundError, match=r"HPS_v2_compressed\.pt.*xswu/HPSv2"):
        HPSv2Scorer("xswu/HPSv2", model=MODEL_CONFIG, version="v2", device="cpu", cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------
# HPS v2: errors


def test_missing_checkpoint_path_is_named(tmp_path):
    missing = tmp_path / "ckpt" / "HPS_v2_compressed.pt"
    with pytest.raises(FileNotFoundError, match=r"HPS_v2_compressed\.pt.* does not exist"):
        HPSv2Scorer(missing, model=MODEL_CONFIG, device="cpu")


def test_missing_model_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        HPSv2Scorer(CHECKPOINT, model=tmp_path / "nowhere.json", device="cpu")


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match=r"unknown open_clip architecture 'ViT-H-15'.*ViT-H-14"):
        HPSv2Scorer(CHECKPOINT, model="ViT-H-15", device="cpu")


def test_checkpoint_for_another_architecture_is_reported():
    # A real open_clip name builds fine, but the tiny checkpoint does not fit it.
    with pytest.raises(ValueError, match=r"does not match open_clip architecture 'ViT-S-32-alt'.*shape mismatch"):
        HPSv2Scorer(CHECKPOINT, model="ViT-S-32-alt", device="cpu")


def test_state_dict_mismatch_lists_keys(tmp_path, model_cfg, state_dict):
    broken = dict(state_dict)
    del broken["ln_final.weight"]
    broken["extra.head"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save({"state_dict": broken}, path)
    with pytest.raises(ValueError, match=r"broken\.pt.*missing ln_final\.weight; unexpected extra\.head"):
        HPSv2Scorer(path, model=model_cfg, device="cpu")
    wider = {**model_cfg, "embed_dim": 16}
    with pytest.raises(ValueError, match=r"shape mismatch.*text_projection: weights \(64, 32\) vs model \(64, 16\)"):
        HPSv2Scorer(CHECKPOINT, model=wider, device="cpu")


@pytest.mark.parametrize("content", [b"not a torch file", None])
def test_unreadable_checkpoint_is_named(tmp_path, model_cfg, content):
    path = tmp_path / "odd.pt"
    if content is None:
        torch.save({"epoch": 3}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"odd\.pt"):
        HPSv2Scorer(path, model=model_cfg, device="cpu")


def test_bad_model_cfg_is_named(model_cfg):
    with pytest.raises(ValueError, match="lacks text_cfg"):
        HPSv2Scorer(CHECKPOINT, model={"embed_dim": 32, "vision_cfg": {}}, device="cpu")
    with pytest.raises(ValueError, match="not accepted by open_clip.CLIP"):
        HPSv2Scorer(CHECKPOINT, model={**model_cfg, "colour": "red"}, device="cpu")


def test_hps_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown HPS version 'v3'"):
        HPSv2Scorer(CHECKPOINT, model=MODEL_CONFIG, version="v3")
    with pytest.raises(ValueError, match="batch_size"):
        HPSv2Scorer(CHECKPOINT, model=MODEL_CONFIG, batch_size=0)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        HPSv2Scorer(CHECKPOINT, model=MODEL_CONFIG, dtype="float8")


def test_score_rejects_mismatched_or_wrong_inputs(hps):
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="2 images and 1 prompts"):
        hps.score([image, image], ["one prompt"])
    with pytest.raises(TypeError, match=r"images\[0\]"):
        hps.score(["not-an-image.png"], ["a prompt"])
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        hps.score([image], [None])


# ---------------------------------------------------------------------------------------------------
# CLIPScore on a tiny random CLIPModel


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIPModel with a hand-written BPE vocabulary and a 32-pixel image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*letters, *(letter + "</w>" for letter in letters), "at</w>", "ca", "cat</w>"]:
        vocab[token] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\na t</w>\nc a\nc at</w>\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=16)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_clip_scores_are_finite_and_deterministic(tiny_clip_dir):
    images = odd_images()
    prompts = ["a cat", "a cat on a mat", "x" * 200, "", "cat", "at", "a", "mat"]
    scorer = CLIPScorer(tiny_clip_dir, device="cpu")
    first = scorer.score(images, prompts)
    assert len(first) == len(images)
    assert all(math.isfinite(score) and 0 <= score <= 100 for score in first)
    assert scorer.score(images, prompts) == first
    rebuilt = CLIPScorer(tiny_clip_dir, device="cpu", batch_size=3)
    assert rebuilt.score(images, prompts) == pytest.approx(first, abs=1e-4)


def test_clip_errors(tmp_path, tiny_clip_dir):
    with pytest.raises(FileNotFoundError, match="no-such-clip"):
        CLIPScorer(tmp_path / "no-such-clip", device="cpu")
    scorer = CLIPScorer(tiny_clip_dir, device="cpu")
    with pytest.raises(ValueError, match="1 images and 2 prompts"):
        scorer.score([Image.new("RGB", (8, 8))], ["a", "b"])


# ---------------------------------------------------------------------------------------------------
# registry and config


def test_registry_builds_by_name():
    scorer = build_scorer("hps-v2", checkpoint=str(CHECKPOINT), model=str(MODEL_CONFIG), device="cpu")
    assert isinstance(scorer, HPSv2Scorer) and scorer.version == "v2"
    assert {"hps-v2", "hps-v2.1", "clip"} <= set(scorer_names())


def test_registry_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown scorer 'hps-v3'; known scorers: clip, hps-v2, hps-v2\.1"):
        build_scorer("hps-v3")


def test_registry_rejects_duplicates():
    with pytest.raises(ValueError, match="'clip' is already registered"):
        register_scorer("clip", CLIPScorer)


def test_scorer_config_fields_have_defaults_and_descriptions():
    for name, field in ScorerConfig.model_fields.items():
        assert not field.is_required(), f"ScorerConfig.{name} has no default"
        assert field.description, f"ScorerConfig.{name} has no description"


def test_scorer_config_validates_and_builds(tiny_clip_dir):
    with pytest.raises(ValueError, match="unknown scorer 'hpsv2'"):
        ScorerConfig(name="hpsv2")
    with pytest.raises(ValueError, match="extra"):
        ScorerConfig(name="clip", ckpt="x")
    with pytest.raises(ValueError, match="takes no checkpoint"):
        ScorerConfig(name="clip", checkpoint="x.pt")
    config = ScorerConfig(name="clip", model=str(tiny_clip_dir), device="cpu", batch_size=4)
    assert isinstance(build_scorer_from_config(config), CLIPScorer)
    hps_config = ScorerConfig(name="hps-v2", checkpoint=str(CHECKPOINT), model=str(MODEL_CONFIG), dtype="float32")
    assert isinstance(build_scorer_from_config(hps_config), HPSv2Scorer)


def test_importing_the_registry_loads_no_torch():
    code = "import sys, actors.scoring.registry; assert 'torch' not in sys.modules and 'open_clip' not in sys.modules"
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)
