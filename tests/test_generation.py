"""MGTPipeline.generate: batch invariance, reproducibility, defaults and input checks."""

import pytest
import torch

import mgt

PROMPTS = ["a red circle", "two blue squares at the top", "", "a green triangle left of a yellow star",
           "an orange circle in the centre"]


@pytest.fixture(scope="module")
def meissonic():
    return mgt.load_pipeline("tiny-meissonic", device="cpu")


@pytest.mark.parametrize("name", ["tiny-meissonic", "tiny-monetico", "tiny-amused"])
def test_prompt_alone_equals_prompt_in_batch(name):
    """A prompt's tokens depend only on (prompt, seed, config), not on its batch-mates (CPU, fp32)."""
    pipe = mgt.load_pipeline(name, device="cpu")
    seeds = [11, 22, 33, 44, 55]
    batch = pipe.generate(PROMPTS, seeds, steps=8, decode=False).tokens
    for i in (0, 3):
        alone = pipe.generate([PROMPTS[i]], [seeds[i]], steps=8, decode=False).tokens
        assert torch.equal(alone[0], batch[i])


def test_image_alone_equals_image_in_batch(meissonic):
    """Decoding is batch invariant too: a VQ decode over 4 images moved 5 pixel values by one level."""
    tokens = meissonic.generate(["a red circle", "a blue square", "a blue square", "a cat"], [1, 2, 3, 4],
                                width=64, height=64, steps=4, decode=False).tokens
    together = meissonic.decode(tokens)
    for i in range(len(tokens)):
        assert (meissonic.decode(tokens[i:i + 1])[0] == together[i]).all(), i


def test_same_seed_same_image_other_seed_other_image(meissonic):
    a = meissonic.generate(["a red circle"], [1], steps=6)
    b = meissonic.generate(["a red circle"], [1], steps=6)
    c = meissonic.generate(["a red circle"], [2], steps=6)
    assert (a.images == b.images).all()
    assert not torch.equal(a.tokens, c.tokens)


def test_defaults_come_from_the_model(meissonic):
    out = meissonic.generate([""], [0])  # empty prompt = unconditional; tiny defaults: 16 steps, 64 px
    assert out.nfe == meissonic.defaults.steps == 16
    assert out.images.shape == (1, 64, 64, 3)
    assert meissonic.defaults.negative_prompt.startswith("worst quality")


@pytest.mark.parametrize("kwargs,message", [
    ({"width": 60}, "nearest valid: 56 or 64"),
    ({"height": 4}, "not a multiple of 8"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"guidance": -1.0}, "guidance must be >= 0"),
    ({"negative_prompts": ["a", "b"]}, "2 negative prompts for 1 prompts"),
])
def test_bad_settings_raise_clear_errors(meissonic, kwargs, message):
    with pytest.raises(ValueError, match=message):
        meissonic.generate(["x"], [0], **kwargs)


def test_prompt_and_seed_counts_must_match(meissonic):
    with pytest.raises(ValueError, match="one seed per prompt"):
        meissonic.generate(["a", "b"], [0])


def test_guidance_at_most_one_skips_the_unconditional_branch(meissonic):
    calls = []
    handle = meissonic.transformer.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        meissonic.generate(["a", "b"], [0, 1], steps=2, guidance=1.0, decode=False)
        meissonic.generate(["a", "b"], [0, 1], steps=2, guidance=9.0, decode=False)
    finally:
        handle.remove()
    assert calls == [1, 1, 1, 1, 2, 2, 2, 2]  # micro_batch=1: one forward per sample (with its CFG pair)
