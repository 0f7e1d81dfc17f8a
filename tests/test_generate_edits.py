"""``maskray generate`` with editing columns (``init_image``, ``mask_image``, ``strength``) on real Ray: a prompt
table mixing plain, img2img and inpainting rows and bad images, on local disk and over the S3 protocol (moto).

Every sample lands once; an edit row's image is pixel-identical to the engine's own output for its seed and
that output keeps the kept tokens; a missing or mis-sized image fails its row only, with an error naming it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from generate_helpers import check_exactly_once, config
from PIL import Image

from pipeline.prompts import PromptInputError, scan_prompts
from pipeline.storage import Storage

STEPS, NUM_IMAGES = 4, 2


def write_inputs(folder, mask_uri: str) -> list[str]:
    """Images under ``folder/images`` and ``folder/prompts.parquet``; returns the prompt ids.

    Rows: two plain, one img2img (relative path, strength 0.75), two inpainting (one relative mask, one given
    as ``mask_uri``), a missing image and an image of the wrong size.
    """
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "images" / "a.png")
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / "images" / "big.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, 16:] = 255  # redraw the right half
    Image.fromarray(mask, mode="L").save(folder / "images" / "m.png")
    rows = [("plain-0", None, None, None), ("plain-1", None, None, None),
            ("img2img", "images/a.png", None, 0.75), ("inpaint", "images/a.png", "images/m.png", None),
            ("inpaint-uri", "images/a.png", mask_uri, 1.0), ("missing", "images/missing.png", None, None),
            ("big", "images/big.png", None, None)]
    pq.write_table(pa.table({"prompt_id": [r[0] for r in rows], "prompt": [f"shape {r[0]}" for r in rows],
                             "init_image": pa.array([r[1] for r in rows], pa.string()),
                             "mask_image": pa.array([r[2] for r in rows], pa.string()),
                             "strength": pa.array([r[3] for r in rows], pa.float64())}), folder / "prompts.parquet")
    return [r[0] for r in rows]


def check_run(metrics: pa.Table, ids: list[str], root: str, mask_uri: str, read) -> None:
    """Exactly once, edit inputs recorded, errors only on the bad rows, edit images equal to the engine's."""
    import mgt
    import mgt.editing
    from mgt.config import GenerationSettings
    from mgt.editing import Edit

    check_exactly_once(metrics, ids, NUM_IMAGES)
    rows = {(r["prompt_id"], r["sample_idx"]): r for r in metrics.to_pylist()}
    image, mask = f"{root}/images/a.png", f"{root}/images/m.png"
    expected = {"plain-0": (None, None, None), "plain-1": (None, None, None), "img2img": (image, None, 0.75),
                "inpaint": (image, mask, None), "inpaint-uri": (image, mask_uri, 1.0),
                "missing": (f"{root}/images/missing.png", None, None), "big": (f"{root}/images/big.png", None, None)}
    for (prompt_id, _), row in rows.items():
        assert (row["init_image"], row["mask_image"], row["strength"]) == expected[prompt_id], prompt_id
        if prompt_id == "missing":
            assert row["error"].startswith(f"FileNotFoundError: init_image {root}/images/missing.png does not exist")
        elif prompt_id == "big":
            assert f"init_image {root}/images/big.png is 48x48 but this run generates 32x32" in row["error"]
        else:
            assert row["error"] is None and row["image_uri"], (prompt_id, row["error"])
    assert (metrics["error"].null_count, len(rows)) == (5 * NUM_IMAGES, 7 * NUM_IMAGES)

    pipe = mgt.load_pipeline("tiny-meissonic", device="cpu")
    settings = GenerationSettings(steps=STEPS, width=32, height=32)
    init = Image.open(io.BytesIO(read(image))).convert("RGB")
    mask_image = Image.open(io.BytesIO(read(mask))).convert("L")
    source = mgt.editing.image_tokens(pipe.vqvae, [init])[0]
    kept = ~mgt.editing.mask_grid(mask_image, *source.shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actors (0.5 CPU each: one thread)
    try:
        for prompt_id, edit in (("img2img", Edit(init, None, 0.75)), ("inpaint", Edit(init, mask_image)),
                                ("inpaint-uri", Edit(init, mask_image, 1.0))):
            for sample_idx in range(NUM_IMAGES):
                row = rows[(prompt_id, sample_idx)]
                direct = settings.generate(pipe, [row["prompt"]], [row["seed"]], edits=[edit])
                job = np.asarray(Image.open(io.BytesIO(read(row["image_uri"]))).convert("RGB"))
                assert np.array_equal(job, direct.images[0]), (prompt_id, sample_idx)
                if edit.mask is not None:  # the image the job wrote decodes tokens that kept the unmasked ones
                    assert torch.equal(direct.tokens[0][kept], source[kept]) and not kept.all(), prompt_id
    finally:
        torch.set_num_threads(threads)


def test_mixed_edit_table_local(ray_local, tmp_path):
    from pipeline.generate import run_generate
    from pipeline.manifest import read_metrics

    inputs = tmp_path / "inputs"
    mask_uri = str(inputs / "images" / "m.png")  # an absolute path: kept as it is
    ids = write_inputs(inputs, mask_uri)
    summary = run_generate(config(str(inputs / "prompts.parquet"), str(tmp_path / "out"), steps=STEPS,
                                  num_images=NUM_IMAGES), log=lambda _: None)
    assert (summary.rows, summary.errors) == (14, 4)
    metrics = read_metrics(Storage(str(tmp_path / "out")))
    check_run(metrics, ids, str(inputs), mask_uri, lambda path: Path(path).read_bytes())

    # A run recorded before the editing columns existed stays readable: resuming it finalizes its records
    # with those columns null (keep_failed: a plain rerun would redo the shards holding the error rows).
    for record in (tmp_path / "out" / "_shards").glob("*.parquet"):
        pq.write_table(pq.read_table(record).drop_columns(["init_image", "mask_image", "strength"]), record)
    summary = run_generate(config(str(inputs / "prompts.parquet"), str(tmp_path / "out"), steps=STEPS,
                                  num_images=NUM_IMAGES, keep_failed=True), log=lambda _: None)
    assert (summary.rows, summary.errors) == (14, 4)
    old = read_metrics(Storage(str(tmp_path / "out")))
    assert old.num_rows == 14 and old["init_image"].null_count == old["strength"].null_count == 14


def test_mixed_edit_table_on_s3(ray_local, tmp_path, s3):
    import s3fs

    from pipeline.generate import run_generate
    from pipeline.manifest import read_metrics

    fs = s3fs.S3FileSystem(**s3)
    fs.mkdir("edits")
    mask_uri = "s3://edits/inputs/images/m.png"  # a URI: kept as it is
    ids = write_inputs(tmp_path / "inputs", mask_uri)
    fs.put(str(tmp_path / "inputs") + "/", "edits/inputs/", recursive=True)
    summary = run_generate(config("s3://edits/inputs/prompts.parquet", "s3://edits/run", steps=STEPS,
                                  num_images=NUM_IMAGES, storage_options=s3), log=lambda _: None)
    assert (summary.rows, summary.errors) == (14, 4)
    metrics = read_metrics(Storage("s3://edits/run", s3))
    check_run(metrics, ids, "s3://edits/inputs", mask_uri, fs.cat_file)


def scan(tmp_path, **columns):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], **columns}), path)
    return scan_prompts(str(path), Storage(str(path)), 1)


def test_edit_columns_are_checked_before_ray(tmp_path):
    images = pa.array(["x.png", None, "y.png"], pa.string())
    assert scan(tmp_path, init_image=images).columns == ["prompt", "init_image"]
    assert scan(tmp_path, init_image=images, mask_image=pa.array([None, None, "m.png"], pa.string()),
                strength=pa.array([0.5, None, 1.0])).columns == ["prompt", "init_image", "mask_image", "strength"]
    with pytest.raises(PromptInputError, match=r"column 'init_image' is int64, expected string"):
        scan(tmp_path, init_image=[1, 2, 3])
    with pytest.raises(PromptInputError, match=r"column 'strength' is int64, expected float"):
        scan(tmp_path, init_image=images, strength=[1, 1, 1])
    with pytest.raises(PromptInputError, match=r"has \['mask_image'\] but no 'init_image' column"):
        scan(tmp_path, mask_image=images)
    with pytest.raises(PromptInputError, match=r"p.parquet rows \[1\] \(in file order\) have a mask_image but no "
                                               r"init_image"):
        scan(tmp_path, init_image=images, mask_image=pa.array([None, "m.png", ""], pa.string()))
    with pytest.raises(PromptInputError, match=r"rows \[1\] \(in file order\) have a strength but no init_image"):
        scan(tmp_path, init_image=images, strength=pa.array([None, 0.5, None]))
    with pytest.raises(PromptInputError, match=r"rows \[0, 2\] \(in file order\) have a strength outside \(0, 1\]"):
        scan(tmp_path, init_image=images, strength=pa.array([0.0, None, 1.5]))
    # The edit inputs are not part of the derived id: one prompt over several images needs prompt_id.
    path = tmp_path / "same.parquet"
    pq.write_table(pa.table({"prompt": ["blue", "blue"], "init_image": ["a.png", "b.png"]}), path)
    with pytest.raises(PromptInputError, match="duplicate derived id"):
        scan_prompts(str(path), Storage(str(path)), 1)
