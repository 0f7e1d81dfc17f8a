"""`maskray sample --init-image`: img2img, inpainting and outpainting end to end on tiny aMUSEd, local and S3."""

import json

import numpy as np
import pytest
from PIL import Image

import mgt
from jobs.cli import main
from mgt.editing import Edit, outpaint_canvas

BASE = ["sample", "--model", "tiny-amused", "--device", "cpu", "--steps", "6", "--seed", "3"]


def picture(width=64, height=64) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width] / 63.0
    return Image.fromarray((np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], -1) * 255).round().astype(np.uint8))


@pytest.fixture()
def files(tmp_path):
    picture().save(tmp_path / "init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:40] = 255
    Image.fromarray(mask, mode="L").save(tmp_path / "mask.png")
    return tmp_path


@pytest.fixture(scope="module")
def pipe():
    return mgt.load_pipeline("tiny-amused", device="cpu")


def written(folder) -> tuple[np.ndarray, dict]:
    (path,) = folder.glob("*.png")
    image = Image.open(path)
    return np.asarray(image), json.loads(image.text["maskray"])


@pytest.mark.parametrize("use", ["img2img", "inpaint"])
def test_sample_edits_the_init_image_as_the_engine_does(files, pipe, use):
    extra = ["--strength", "0.5"] if use == "img2img" else ["--mask-image", str(files / "mask.png")]
    argv = BASE + ["--prompt", "a red circle", "--init-image", str(files / "init.png"), "--out", str(files / "out")]
    assert main(argv + extra) == 0
    pixels, meta = written(files / "out")
    mask = Image.open(files / "mask.png") if use == "inpaint" else None
    strength = 0.5 if mask is None else None
    expected = pipe.generate(["a red circle"], [3], steps=6, edits=[Edit(picture(), mask, strength)])
    assert np.array_equal(pixels, expected.images[0])
    assert meta["init_image"] == str(files / "init.png") and meta["seed"] == 3
    assert ("strength" in meta) == (use == "img2img") and ("mask_image" in meta) == (use == "inpaint")


def test_sample_outpaints_a_larger_canvas(tmp_path, pipe):
    picture(32, 32).save(tmp_path / "small.png")
    argv = BASE + ["--prompt", "a field", "--init-image", str(tmp_path / "small.png"), "--outpaint", "16,0,16,32",
                   "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    pixels, meta = written(tmp_path / "out")
    assert pixels.shape == (64, 64, 3) and meta["outpaint"] == [16, 0, 16, 32]
    canvas, mask = outpaint_canvas(picture(32, 32), (16, 0, 16, 32), pipe.vae_scale_factor)
    expected = pipe.generate(["a field"], [3], steps=6, edits=[Edit(canvas, mask)])
    assert np.array_equal(pixels, expected.images[0])


def test_sample_reads_images_from_s3(files, s3_env, pipe):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_env)
    fs.mkdir("inputs")
    fs.put(str(files / "init.png"), "inputs/init.png")
    fs.put(str(files / "mask.png"), "inputs/mask.png")
    argv = BASE + ["--prompt", "x", "--init-image", "s3://inputs/init.png", "--mask-image", "s3://inputs/mask.png",
                   "--out", str(files / "out")]
    assert main(argv) == 0
    pixels, meta = written(files / "out")
    expected = pipe.generate(["x"], [3], steps=6, edits=[Edit(picture(), Image.open(files / "mask.png"))])
    assert np.array_equal(pixels, expected.images[0]) and meta["mask_image"] == "s3://inputs/mask.png"
    assert main(BASE + ["--prompt", "x", "--init-image", "s3://inputs/gone.png", "--out", str(files)]) == 2


@pytest.mark.parametrize("make,argv,message", [
    (None, ["--init-image", "{d}/missing.png"], "--init-image {d}/missing.png does not exist; check the path"),
    ("text", ["--init-image", "{d}/notes.png"], "--init-image {d}/notes.png is not an image"),
    ("odd", ["--init-image", "{d}/odd.png"], "{d}/odd.png is 66x64: width 66 is not a multiple of 8"),
    ("small_mask", ["--init-image", "{d}/init.png", "--mask-image", "{d}/small.png"],
     "the mask of {d}/init.png is 32x32 but the image is 64x64; give a mask of the image's size"),
    (None, ["--init-image", "{d}/init.png", "--width", "32", "--height", "32"], "but the batch is 32x32"),
    (None, ["--init-image", "{d}/init.png", "--outpaint", "6,0,0,0"], "must be multiples of 4"),
    (None, ["--init-image", "{d}/init.png", "--strength", "1.5"], "--strength / strength: Input should be less"),
    (None, ["--mask-image", "{d}/mask.png"], "add --init-image PATH"),
    (None, ["--init-image", "{d}/init.png", "--strength", "0.1"], "raise it to at least 0.167"),
])
def test_bad_inputs_are_one_line_errors(files, capsys, make, argv, message):
    if make == "text":
        (files / "notes.png").write_text("not a picture")
    elif make == "odd":
        picture(66, 64).save(files / "odd.png")
    elif make == "small_mask":
        Image.new("L", (32, 32), 255).save(files / "small.png")
    args = [a.format(d=files) for a in argv]
    assert main(BASE + ["--prompt", "x", "--out", str(files / "out")] + args) == 2
    err = capsys.readouterr().err
    assert message.format(d=files) in err and "Traceback" not in err
