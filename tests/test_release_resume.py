"""Output directories written by maskray 0.1.0 (commit a906ea8, before the sink and family seams) resume
under the current code with nothing regenerated, and a shard whose record is deleted is regenerated to the same
bytes: config hashes, shard names, completion records and image encoding are unchanged.

The fixture ``tests/fixtures/release-0.1.0/`` was written by that release (see tests/fixtures/README.md): six
prompts, two shards of three, tiny-meissonic at 32x32 and 2 steps, one output folder per layout.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from generate_helpers import config

RELEASE = Path(__file__).resolve().parent / "fixtures" / "release-0.1.0"
LAYOUTS = ("files", "webdataset", "both")
STABLE = ["prompt_id", "sample_idx", "prompt", "seed", "shard", "image_bytes", "sampler_hash", "config_hash", "nfe"]


def _release_config(out: Path, layout: str):
    return config(str(RELEASE / "prompts" / "part-0.parquet"), str(out), steps=2, layout=layout, shard_size=3)


def _copy(layout: str, tmp_path: Path) -> Path:
    out = tmp_path / f"out-{layout}"
    shutil.copytree(RELEASE / f"out-{layout}", out)
    return out


def _images(out: Path) -> dict[str, bytes]:
    """Every image the run wrote, by name: files under images/ and image members of the tars under webdataset/
    (the tars' ``.json`` members are listed by name only: they carry timings and the attempt)."""
    found = {p.name: p.read_bytes() for p in (out / "images").glob("*")} if (out / "images").is_dir() else {}
    for tar in sorted((out / "webdataset").glob("*.tar")) if (out / "webdataset").is_dir() else []:
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.isfile():
                    data = archive.extractfile(member).read()
                    found[f"{tar.name}/{member.name}"] = b"" if member.name.endswith(".json") else data
    return found


@pytest.mark.parametrize("layout", LAYOUTS)
def test_release_config_hash_is_unchanged(layout):
    recorded = json.loads((RELEASE / f"out-{layout}" / "manifest.json").read_text())["config_hash"]
    assert _release_config(Path("out"), layout).config_hash() == recorded


@pytest.mark.parametrize("layout", LAYOUTS)
def test_release_output_resumes_with_nothing_regenerated(ray_local, tmp_path, layout):
    from pipeline.generate import run_generate

    out = _copy(layout, tmp_path)
    before = pq.read_table(RELEASE / f"out-{layout}" / "metrics.parquet").select(STABLE).sort_by("prompt_id")
    images = _images(out)
    result = run_generate(_release_config(out, layout), log=lambda _: None)
    assert (result.rows, result.generated, result.errors) == (6, 0, 0)
    assert pq.read_table(out / "metrics.parquet").select(STABLE).sort_by("prompt_id").equals(before)
    assert _images(out) == images


@pytest.mark.parametrize("layout", LAYOUTS)
def test_release_shard_regenerates_to_the_same_bytes(ray_local, tmp_path, layout):
    from pipeline.generate import run_generate

    out = _copy(layout, tmp_path)
    images = _images(out)
    before = pq.read_table(RELEASE / f"out-{layout}" / "metrics.parquet").select(STABLE).sort_by("prompt_id")
    lost = sorted((out / "_shards").glob("*.parquet"))[1]
    lost_ids = set(pq.read_table(lost)["prompt_id"].to_pylist())
    lost.unlink()  # the second shard's record, its images and its tar are gone
    for path in (out / "images").glob("*") if (out / "images").is_dir() else []:
        if path.name.split("-")[0] in lost_ids:
            path.unlink()
    for tar in (out / "webdataset").glob(f"{lost.stem}.tar"):
        tar.unlink()
    result = run_generate(_release_config(out, layout), log=lambda _: None)
    assert (result.rows, result.generated) == (6, 3)
    assert pq.read_table(out / "metrics.parquet").select(STABLE).sort_by("prompt_id").equals(before)
    assert _images(out) == images
