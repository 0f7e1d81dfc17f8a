"""MaskGIT against valeoai/Maskgit-pytorch: transformer logits, VQGAN codes and images, both samplers' tokens.

The fixtures (tests/fixtures/maskgit-tiny-*/, see the README there) are the reference's own outputs on tiny
random weights; the sampler runs are single samples seeded as the reference seeds (torch and numpy with the
same integer), which per-sample generators reproduce exactly. Batches are checked for batch invariance.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from maskgit_helpers import reference_transformer
from safetensors.torch import load_file

from mgt.models import vqgan
from mgt.models.maskgit import reference_state_dict
from mgt.sampling import maskgit as maskgit_sampling
from mgt.sampling.maskgit import ConfidenceSettings, HaltonSettings

STYLES = ["maskgit-tiny-256style", "maskgit-tiny-512style"]
RUNS = ["confidence-v1.0-seed1", "confidence-v1.0-seed42", "confidence-v1.0-nocfg-seed9",
        "confidence-v1.0-init-seed5", "confidence-v2.0-seed1", "confidence-v2.0-seed42", "halton-seed1",
        "halton-plain-seed42", "confidence-v1.0-maskboost-seed3", "confidence-v2.0-maskboost-seed3"]


@pytest.fixture(scope="module", params=STYLES)
def style(request, fixtures_dir, one_torch_thread):
    """(folder, transformer with the reference weights loaded strictly, the runs recorded in config.json)."""
    folder = fixtures_dir / request.param
    model, config = reference_transformer(folder)
    return folder, model.eval(), config["runs"]


def test_forward_logits_equal_the_reference(style):
    folder, model, _ = style
    ref = load_file(folder / "reference_forward.safetensors")
    with torch.no_grad():
        logits = model(ref["tokens"], ref["labels"], ref["drop_label"].bool())
    batch, side = ref["tokens"].shape[:2]
    expected = ref["logits"].transpose(1, 2).reshape(batch, -1, side, side)  # reference: (B, N, C) token-major
    assert logits.shape == (batch, model.config.codebook_size + 1, side, side)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(logits, expected), "same operations in the same order: the logits should be bit-identical"


def _settings(run: dict) -> ConfidenceSettings | HaltonSettings:
    ref = run["settings"]
    if run["sampler"] == "halton":
        return HaltonSettings(steps=ref["step"], softmax_temperature_min=ref["sm_temp_min"],
                              softmax_temperature_max=ref["sm_temp_max"], temperature_power=ref["temp_pow"],
                              warmup_steps=ref["temp_warmup"], guidance=ref["w"], randomize=ref["randomize"])
    return ConfidenceSettings(steps=ref["step"], softmax_temperature=ref["sm_temp"], gumbel_temperature=ref["r_temp"],
                              guidance=ref["w"], revision=run["revision"])


def _sample(model, run: dict, labels: list[int], seeds: list[int], init: torch.Tensor | None = None) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    sampler = maskgit_sampling.halton_sample if run["sampler"] == "halton" else maskgit_sampling.confidence_sample
    return sampler(model, torch.tensor(labels), generators, _settings(run), init_tokens=init)


@pytest.mark.parametrize("name", RUNS)
def test_sampler_tokens_equal_the_reference(style, name):
    folder, model, runs = style
    run, recorded = runs[name], load_file(folder / "reference_samples.safetensors")
    init = recorded["init_tokens"] if run["init"] else None
    if run["mask_logit_boost"]:  # the mask token is drawn often: the revisions' handling of such draws differs
        model = copy.deepcopy(model)
        with torch.no_grad():
            model.bias[:, model.mask_token_id] += run["mask_logit_boost"]
    tokens = _sample(model, run, [run["label"]], [run["seed"]], init)
    assert torch.equal(tokens, recorded[name]), f"{name}: {(tokens != recorded[name]).sum()} tokens differ"


@pytest.mark.parametrize("name", ["confidence-v1.0-seed1", "confidence-v2.0-seed1", "halton-seed1"])
def test_samplers_are_batch_invariant(style, name):
    _, model, runs = style
    run, labels, seeds = runs[name], [3, 7, 0], [1, 42, 2**40 + 5]
    together = _sample(model, run, labels, seeds)
    for b in range(len(seeds)):
        assert torch.equal(together[b:b + 1], _sample(model, run, labels[b:b + 1], seeds[b:b + 1])), f"sample {b}"


def test_vqgan_codes_and_images_match_the_reference(fixtures_dir, one_torch_thread):
    folder = fixtures_dir / "maskgit-tiny-vqgan"
    config = json.loads((folder / "config.json").read_text())
    state = {key: value.float() for key, value in load_file(folder / "vqgan.safetensors").items()}
    state["loss.discriminator.main.0.weight"] = torch.zeros(1)  # Lightning checkpoints carry the training loss
    vq = vqgan.load_taming_vqgan(config["ddconfig"], config["n_embed"], config["embed_dim"], state)
    ref = load_file(folder / "reference_vqgan.safetensors")
    assert torch.equal(vqgan.image_tokens(vq, ref["images"]), ref["tokens"])
    images = vqgan.decode_tokens(vq, ref["tokens"])
    torch.testing.assert_close(images, ref["decoded"].clamp(-1, 1), atol=1e-5, rtol=1e-4)
    pixels = vqgan.to_uint8(images)
    assert pixels.shape == (2, 16, 16, 3) and pixels.dtype == torch.uint8


def test_reference_checkpoint_layouts_give_the_bare_state_dict():
    weights = {"bias": torch.zeros(2)}
    assert reference_state_dict({"model_state_dict": weights, "iter": 3}) == weights
    assert reference_state_dict({"module.bias": weights["bias"]}) == weights
    with pytest.raises(ValueError, match="not a MaskGIT checkpoint"):
        reference_state_dict({"state_dict": weights})
