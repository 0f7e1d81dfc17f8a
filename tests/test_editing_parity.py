"""Editing is token-exact with diffusers 0.42.1's AmusedImg2ImgPipeline and AmusedInpaintPipeline on tiny aMUSEd.

As tests/test_vanilla_parity.py does for generation: the reference pipelines are built from the same tiny-amused
folder, called with batch 1 and one generator, and asked for latents (token ids). Our per-sample generators
reproduce those batch-1 calls, also when the sample shares a batch with other edits and plain generations.
"""

import numpy as np
import pytest
import torch
from diffusers import AmusedImg2ImgPipeline, AmusedInpaintPipeline, AmusedScheduler, UVit2DModel, VQModel
from PIL import Image
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

import mgt
from mgt.editing import Edit
from mgt.hub.loading import resolve_model_path
from mgt.sampling.sampler_config import SamplerConfig

PROMPT = "a red circle left of a blue square"


def _reference(cls):
    folder = resolve_model_path("tiny-amused")
    pipe = cls(
        vqvae=VQModel.from_pretrained(folder / "vqvae"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder"),
        transformer=UVit2DModel.from_pretrained(folder / "transformer"),
        scheduler=AmusedScheduler(mask_token_id=64),  # a fresh one: the inpaint pipeline switches it to linear
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours():
    return mgt.load_pipeline("tiny-amused", device="cpu")


@pytest.fixture(scope="module")
def image():
    """A smooth 64x64 picture (random pixels would make every token the same few codes)."""
    y, x = np.mgrid[0:64, 0:64] / 63.0
    pixels = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], -1)
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


def _mask(kind: str) -> Image.Image:
    mask = np.zeros((64, 64), np.uint8)
    if kind == "square":
        mask[16:48, 20:52] = 255
    elif kind == "left-half":
        mask[:, :32] = 255
    else:  # a disc with soft edges: the lanczos resize and the 0.5 threshold decide its border tokens
        y, x = np.mgrid[0:64, 0:64]
        mask = np.clip(255 * (22 - np.hypot(x - 30, y - 34)) / 6, 0, 255).astype(np.uint8)
    return Image.fromarray(mask, mode="L")


@pytest.mark.parametrize("seed,strength,steps,guidance", [
    (0, 0.5, 12, 10.0), (3, 0.3, 12, 4.0), (7, 0.75, 8, 1.0), (11, 0.95, 10, 10.0),
])
def test_img2img_equals_amused_img2img_pipeline(ours, image, seed, strength, steps, guidance):
    reference = _reference(AmusedImg2ImgPipeline)
    expected = reference(PROMPT, image=image, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                         generator=torch.Generator().manual_seed(seed), output_type="latent").images
    got = ours.generate([PROMPT], [seed], steps=steps, guidance=guidance, decode=False,
                        edits=[Edit(image, strength=strength)])
    assert torch.equal(got.tokens, expected.cpu())
    assert got.nfe == int(steps * strength)


@pytest.mark.parametrize("seed,strength,mask,steps", [
    (0, 1.0, "square", 12), (5, 0.6, "square", 12), (9, 1.0, "disc", 8), (2, 0.8, "left-half", 10),
])
def test_inpainting_equals_amused_inpaint_pipeline(ours, image, seed, strength, mask, steps):
    reference = _reference(AmusedInpaintPipeline)
    expected = reference(PROMPT, image=image, mask_image=_mask(mask), strength=strength, num_inference_steps=steps,
                         guidance_scale=10.0, generator=torch.Generator().manual_seed(seed),
                         output_type="latent").images
    linear = SamplerConfig(mask_schedule="linear")  # AmusedInpaintPipeline registers the linear schedule
    got = ours.generate([PROMPT], [seed], steps=steps, guidance=10.0, sampler=linear, decode=False,
                        edits=[Edit(image, _mask(mask), strength)])
    assert torch.equal(got.tokens, expected.cpu())
    assert got.nfe == int(steps * strength)


def test_per_sample_generators_reproduce_batch_1_calls_in_a_mixed_batch(ours, image):
    """Two img2img strengths, an inpainting and a plain generation in one batch: each equals diffusers alone."""
    img2img, inpaint = _reference(AmusedImg2ImgPipeline), _reference(AmusedInpaintPipeline)
    prompts, seeds = ["a", PROMPT, "b", "c"], [4, 5, 6, 7]
    edits = [Edit(image, strength=0.5), Edit(image, _mask("square")), None, Edit(image, strength=0.25)]
    got = ours.generate(prompts, seeds, steps=12, guidance=10.0, decode=False, edits=edits,
                        sampler=SamplerConfig(mask_schedule="cosine"))
    for b in (0, 3):
        expected = img2img(prompts[b], image=image, strength=edits[b].strength, num_inference_steps=12,
                           guidance_scale=10.0, generator=torch.Generator().manual_seed(seeds[b]),
                           output_type="latent").images
        assert torch.equal(got.tokens[b], expected[0]), b
    plain = ours.generate(prompts[2:3], seeds[2:3], steps=12, guidance=10.0, decode=False)
    assert torch.equal(got.tokens[2], plain.tokens[0])
    # The inpainting sample ran with the cosine schedule here; alone with the same settings it is the same.
    alone = ours.generate(prompts[1:2], seeds[1:2], steps=12, guidance=10.0, decode=False, edits=edits[1:2])
    assert torch.equal(got.tokens[1], alone.tokens[0])
    linear = ours.generate(prompts[1:2], seeds[1:2], steps=12, guidance=10.0, decode=False, edits=edits[1:2],
                           sampler=SamplerConfig(mask_schedule="linear"))
    expected = inpaint(prompts[1], image=image, mask_image=_mask("square"), num_inference_steps=12,
                       guidance_scale=10.0, generator=torch.Generator().manual_seed(seeds[1]),
                       output_type="latent").images
    assert torch.equal(linear.tokens[0], expected[0])
