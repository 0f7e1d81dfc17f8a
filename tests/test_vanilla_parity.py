"""The vanilla sampler is token-exact with diffusers: step by step, and end to end on tiny aMUSEd."""

import pytest
import torch
from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

import mgt
from mgt.hub.loading import resolve_model_path
from mgt.sampling import loop as sampling
from mgt.sampling.sampler_config import SamplerConfig


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("shape", [(1, 64, 8, 8), (1, 33, 4, 6)])
def test_step_matches_amused_scheduler(schedule, shape):
    """Same logits sequence, same torch.Generator: our tokens equal AmusedScheduler.step's at every step."""
    _, codes, h, w = shape
    mask_id = codes + 3
    steps = 12
    scheduler = AmusedScheduler(mask_token_id=mask_id, masking_schedule=schedule)
    scheduler.set_timesteps(steps)
    logits_gen = torch.Generator().manual_seed(123)
    ours_gen, ref_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ours = ref = torch.full((1, h, w), mask_id, dtype=torch.long)
    config = SamplerConfig(mask_schedule=schedule)
    for i, t in enumerate(scheduler.timesteps):
        logits = torch.randn(shape, generator=logits_gen) * 3
        ref = scheduler.step(logits, t, ref, generator=ref_gen).prev_sample
        flat = sampling.vanilla_step(sampling.to_token_major(logits), ours.reshape(1, -1), i, steps, [ours_gen],
                                     mask_id, config)
        ours = flat.reshape(1, h, w)
        assert torch.equal(ours, ref), f"step {i} differs"
        assert (ours == mask_id).sum() == (ref == mask_id).sum()
    assert not (ours == mask_id).any()


def _diffusers_amused(folder):
    return AmusedPipeline(
        vqvae=VQModel.from_pretrained(folder / "vqvae"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder"),
        transformer=UVit2DModel.from_pretrained(folder / "transformer"),
        scheduler=AmusedScheduler(mask_token_id=64),
    )


@pytest.mark.parametrize("seed,guidance,steps", [(0, 10.0, 12), (5, 1.0, 6), (11, 4.0, 9)])
def test_end_to_end_equals_diffusers_amused_pipeline(seed, guidance, steps):
    folder = resolve_model_path("tiny-amused")
    reference = _diffusers_amused(folder)
    reference.set_progress_bar_config(disable=True)
    ours = mgt.load_pipeline("tiny-amused", device="cpu")
    prompt = "a red circle left of a blue square"
    expected = reference(prompt, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                         generator=torch.Generator().manual_seed(seed), output_type="latent").images
    got = ours.generate([prompt], [seed], steps=steps, guidance=guidance, width=64, height=64, decode=False)
    assert torch.equal(got.tokens, expected.cpu())
    assert got.nfe == steps
