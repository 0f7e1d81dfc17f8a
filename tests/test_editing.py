"""Editing in the engine: kept tokens never change under any sampler preset, samples stay independent of their
batch-mates, outpainting keeps the original region, and bad inputs get errors naming the file and the fix.

The loop's invariants are checked on a bitwise batch-invariant stand-in model (as tests/test_samplers.py does),
then end to end on tiny aMUSEd and tiny Meissonic.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from sampler_helpers import CODES, MASK, SIDE, stand_in

from mgt import editing
from mgt.editing import Edit, EditOptions
from mgt.sampling import loop as sampling
from mgt.sampling.sampler_config import PRESETS, SamplerConfig
from mgt.sampling.z_sampling import MaskedZSampling

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def start_tokens(seed: int, masked_share: float) -> torch.Tensor:
    """`(SIDE, SIDE)` known tokens with ``masked_share`` of them (a random set) masked; 1.0 = plain generation."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CODES, (SIDE, SIDE), generator=g)
    return tokens.masked_fill(torch.rand(SIDE, SIDE, generator=g) < masked_share, MASK)


def run(spec, prompts, seeds, inits, start_step=0, steps=8):
    config = spec if isinstance(spec, SamplerConfig) else SamplerConfig.from_spec(spec)
    init = torch.stack(inits)
    ratio = (init == MASK).flatten(1).sum(-1) / init[0].numel()
    return sampling.sample(stand_in(list(prompts))[0], (len(prompts), SIDE, SIDE), steps,
                           [torch.Generator().manual_seed(s) for s in seeds], MASK, config, guidance=9.0,
                           init=init, start_step=start_step, start_ratio=ratio).tokens


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("start_step", [0, 3])
def test_kept_tokens_are_bit_identical_and_samples_batch_invariant(preset, start_step):
    """Edits (30% and 70% redrawn) and a plain generation in one batch, under every preset."""
    prompts, seeds = (1, 2, 3), (10, 20, 30)
    inits = [start_tokens(0, 0.3), start_tokens(1, 0.7), start_tokens(2, 1.0)]
    batch = run(preset, prompts, seeds, inits, start_step)
    assert not (batch == MASK).any()
    for b, init in enumerate(inits):
        kept = init != MASK
        assert torch.equal(batch[b][kept], init[kept]), b
        alone = run(preset, prompts[b:b + 1], seeds[b:b + 1], inits[b:b + 1], start_step)
        assert torch.equal(alone[0], batch[b]), b
    assert not torch.equal(batch[0], inits[0])  # the masked positions were drawn


def test_kept_tokens_survive_a_hot_gumbel_temperature():
    """At temperature 30 a known token's confidence log(finfo.max) + t g can lose; a kept token's cannot."""
    init = start_tokens(4, 0.5)
    hot = SamplerConfig.from_spec("all:gumbel_temperature=[30, 0]")
    out = run(hot, (1,), (5,), [init])
    assert torch.equal(out[0][init != MASK], init[init != MASK])


def test_nothing_to_redraw_leaves_the_tokens_unchanged():
    """The reference re-masks one known token per step when none is masked; an edit's kept tokens stay."""
    init = start_tokens(6, 0.0)
    assert torch.equal(run("all", (1,), (2,), [init])[0], init)


def test_zsampling_remasks_only_editable_tokens():
    before = torch.tensor([[MASK, MASK, MASK, 7, 8, 9]])
    forward = torch.tensor([[1, 2, MASK, 7, 8, 9]])
    logits = torch.tensor([[0.0, 0.0, 0.0, 9.0, 9.0, 9.0]])[..., None] * torch.tensor([1.0, 0.0])  # kept: confident
    z = MaskedZSampling(remask_count="revealed")
    out = z.remask(before, forward, logits.clone(), [torch.Generator()], MASK, editable=before == MASK)
    assert out.tolist() == [[MASK, MASK, MASK, 7, 8, 9]]
    unrestricted = z.remask(before, forward, logits.clone(), [torch.Generator()], MASK)
    assert (unrestricted[0, 3:] == MASK).sum() == 2  # without the editable set the kept tokens would go


# ------------------------------------------------------------------------------------------ images -> tokens

def picture(width=64, height=64, seed=0) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width] / 63.0
    pixels = np.stack([x, y, 0.5 + 0.5 * np.sin((6 + seed) * x * y)], -1)
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


def square_mask(width=64, height=64) -> Image.Image:
    mask = np.zeros((height, width), np.uint8)
    mask[16:48, 16:40] = 255
    return Image.fromarray(mask, mode="L")


def test_mask_grid_follows_whole_token_cells():
    grid = editing.mask_grid(square_mask(), 16, 16)
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:12, 4:10] = True
    assert torch.equal(grid, expected)


def test_outpaint_canvas_places_the_image_and_masks_the_new_area():
    image = picture(32, 48)
    canvas, mask = editing.outpaint_canvas(image, (8, 4, 16, 0), multiple=4)
    assert canvas.size == mask.size == (56, 52)
    assert np.array_equal(np.asarray(canvas)[4:52, 8:40], np.asarray(image))
    assert np.array_equal(np.asarray(canvas)[0, 0], np.asarray(image)[0, 0])  # edge pixels continued
    white = np.asarray(mask) == 255
    assert not white[4:52, 8:40].any() and white.sum() == 56 * 52 - 32 * 48
    grid = editing.mask_grid(mask, 13, 14)
    assert not grid[1:13, 2:10].any() and grid.sum() == 13 * 14 - 12 * 8


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_keeps_tokens_end_to_end_on_tiny_amused(tiny_amused, preset):
    pipe, sampler = tiny_amused, SamplerConfig.from_spec(preset)
    image, mask = picture(), square_mask()
    edits = [Edit(image, mask), None, Edit(picture(seed=1), strength=0.6)]
    prompts, seeds = ["a red circle", "", "two blue squares"], [3, 4, 5]
    batch = pipe.generate(prompts, seeds, steps=6, sampler=sampler, decode=False, edits=edits)
    assert not (batch.tokens == pipe.mask_token_id).any()
    encoded = editing.image_tokens(pipe.vqvae, [image])[0]
    kept = ~editing.mask_grid(mask, 16, 16)
    assert torch.equal(batch.tokens[0][kept], encoded[kept])
    assert not torch.equal(batch.tokens[0], encoded)
    for b in range(3):
        alone = pipe.generate(prompts[b:b + 1], seeds[b:b + 1], steps=6, sampler=sampler, decode=False,
                              edits=edits[b:b + 1])
        assert torch.equal(alone.tokens[0], batch.tokens[b]), b


@pytest.mark.parametrize("preset", ["vanilla", "all"])
def test_outpainting_keeps_the_original_region_on_tiny_meissonic(tiny_meissonic, preset):
    pipe = tiny_meissonic
    scale = pipe.vae_scale_factor
    image = picture(32, 32)
    canvas, mask = editing.outpaint_canvas(image, (16, 0, 16, 32), multiple=scale)
    out = pipe.generate(["a wide field"], [1], steps=5, decode=True, edits=[Edit(canvas, mask)],
                        sampler=SamplerConfig.from_spec(preset))
    assert out.images.shape == (1, 64, 64, 3)
    grid = (64 // scale, 64 // scale)
    kept = ~editing.mask_grid(mask, *grid)
    assert kept.sum() == (32 // scale) ** 2
    assert torch.equal(out.tokens[0][kept], editing.image_tokens(pipe.vqvae, [canvas])[0][kept])


def test_img2img_strength_sets_the_steps_that_run(tiny_amused):
    out = tiny_amused.generate(["x", "y"], [0, 1], steps=10, decode=False,
                               edits=[Edit(picture(), strength=0.3), Edit(picture(), strength=1.0)])
    assert out.nfe == 10  # the longest group; the 0.3 one ran int(10 * 0.3) = 3 steps
    assert Edit(picture()).start_step(12) == 6 and Edit(picture(), square_mask()).start_step(12) == 0


# ------------------------------------------------------------------------------------------ bad inputs

def test_size_errors_name_the_file_and_the_fix(tiny_amused):
    with pytest.raises(ValueError, match=r"a\.png is 64x64 but the batch is 32x32; resize the image"):
        tiny_amused.generate(["x"], [0], width=32, height=32, edits=[Edit(picture(), name="a.png")])
    with pytest.raises(ValueError, match=r"mask of a\.png is 32x32 but the image is 64x64"):
        tiny_amused.generate(["x"], [0], edits=[Edit(picture(), square_mask(32, 32), name="a.png")])
    with pytest.raises(ValueError, match="init image is 66x64: width 66 is not a multiple of 8"):
        tiny_amused.generate(["x"], [0], edits=[Edit(picture(66, 64))])
    with pytest.raises(ValueError, match=r"runs int\(12 \* 0.05\) = 0 of 12 steps.*at least 0.0833"):
        tiny_amused.generate(["x"], [0], steps=12, edits=[Edit(picture(), strength=0.05)])
    with pytest.raises(ValueError, match="got 2 edits for 1 prompts"):
        tiny_amused.generate(["x"], [0], edits=[None, None])


def test_image_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--init-image .*missing\.png does not exist; check the path"):
        editing.load_image(str(tmp_path / "missing.png"), "--init-image")
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ValueError, match=r"notes\.png is not an image .*pass an image file"):
        editing.load_image(str(tmp_path / "notes.png"), "--mask-image")
    with pytest.raises(ValueError, match="multiples of 8"):
        editing.outpaint_canvas(picture(), (4, 0, 0, 0), multiple=8, name="a.png")


@pytest.mark.parametrize("values,message", [
    ({"mask_image": "m.png"}, "add --init-image"),
    ({"init_image": "a.png", "outpaint": "8,0,8"}, "4 pixel counts"),
    ({"init_image": "a.png", "outpaint": "left"}, "LEFT,TOP,RIGHT,BOTTOM integers"),
    ({"init_image": "a.png", "outpaint": "8,0,8,0", "mask_image": "m.png"}, "drop --mask-image"),
    ({"init_image": "a.png", "strength": 0}, "greater than 0"),
])
def test_edit_options_validate(values, message):
    with pytest.raises(ValueError, match=message):
        EditOptions.model_validate(values)
    assert EditOptions.model_validate({"init_image": "a.png", "outpaint": "8,0,8,0"}).outpaint == (8, 0, 8, 0)
