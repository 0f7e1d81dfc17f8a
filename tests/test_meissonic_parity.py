"""The Meissonic transformer built from diffusers parts reproduces the reference forward (tests/fixtures/)."""

import pytest
import torch
from safetensors.torch import load_file

import mgt
from mgt.models.meissonic import image_rope_ids


@pytest.mark.parametrize("name", ["meissonic-tiny-1024style", "monetico-tiny-512style"])
def test_fixture_logits(fixtures_dir, name):
    folder = fixtures_dir / name
    transformer = mgt.load_transformer(str(folder), dtype="fp32", device="cpu")
    ref = load_file(str(folder / "reference_forward.safetensors"))
    rows = ref["tokens"].shape[1] // transformer.token_grid_multiple
    assert torch.equal(image_rope_ids(rows, rows), ref["img_ids"])
    inputs = (ref["tokens"], ref["encoder_hidden_states"], ref["pooled_projections"], ref["micro_conds"])
    for t in (0, 5, 63):
        logits = transformer(*inputs, torch.tensor([t]))
        atol = 1e-5
        if t == 63:
            # At t=63 the sinusoidal timestep embedding sees 63000 * freq: one float32 ulp of that product moves
            # the logits by ~5e-4, so kernels that round it differently (sin/cos/exp implementations differ by CPU
            # and torch build) disagree by up to that much. The tolerance is that one-ulp sensitivity, measured.
            one_ulp = torch.nextafter(torch.tensor([63000.0]), torch.tensor([float("inf")])) / 1000
            atol = (transformer(*inputs, one_ulp) - logits).abs().max().item()
            assert 1e-5 < atol < 2e-3, f"one-ulp timestep sensitivity {atol} is outside the expected range"
        torch.testing.assert_close(logits, ref[f"logits_t{t}"], atol=atol, rtol=1e-4)


def test_per_sample_timestep_and_one_sample_at_a_time(fixtures_dir):
    folder = fixtures_dir / "meissonic-tiny-1024style"
    transformer = mgt.load_transformer(str(folder), device="cpu")
    ref = load_file(str(folder / "reference_forward.safetensors"))
    for b in range(3):
        one = transformer(ref["tokens"][b:b + 1], ref["encoder_hidden_states"][b:b + 1],
                          ref["pooled_projections"][b:b + 1], ref["micro_conds"][b:b + 1], torch.tensor([5, ])[:1])
        torch.testing.assert_close(one[0], ref["logits_t5"][b], atol=1e-5, rtol=1e-4)


def test_bf16_close_to_own_fp32(fixtures_dir):
    folder = str(fixtures_dir / "meissonic-tiny-1024style")
    ref = load_file(f"{folder}/reference_forward.safetensors")
    fp32 = mgt.load_transformer(folder, dtype="fp32", device="cpu")
    bf16 = mgt.load_transformer(folder, dtype="bf16", device="cpu")
    assert bf16.dtype == torch.bfloat16
    args = (ref["tokens"], ref["encoder_hidden_states"], ref["pooled_projections"], ref["micro_conds"],
            torch.tensor([5]))
    low = bf16(args[0], *(a.to(torch.bfloat16) for a in args[1:4]), args[4]).float()
    high = fp32(*args)
    assert torch.nn.functional.cosine_similarity(low.flatten(), high.flatten(), dim=0) > 0.99


def test_non_square_and_any_multiple_resolution():
    """The RoPE ids follow the post-down-block grid, so a 1024-style model runs at any valid size."""
    pipe = mgt.load_pipeline("tiny-meissonic", device="cpu")
    out = pipe.generate(["a wide scene"], [3], width=96, height=48, steps=4)
    assert out.tokens.shape == (1, 12, 24)
    assert out.images.shape == (1, 48, 96, 3) and out.images.dtype.name == "uint8"
    assert (out.tokens < 64).all()
