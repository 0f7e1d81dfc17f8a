"""Shards of ``maskray generate`` without Ray: image names at scale, the shard plan, the sink's shard assembly
from pieces, a rerun's record check (empty, corrupt, short records) and finalize's collision check."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import manifest
from pipeline.shards import default_shard_size, plan_shards
from pipeline.sinks.base import image_name
from pipeline.sinks.datasink import METRICS_SCHEMA, SampleSink
from pipeline.storage import Storage

RUN = {"model": "m", "quantization": "fp32", "sampler": "{}", "sampler_hash": "h", "config_hash": "c",
       "scorer": None, "attempt": 0}


def test_a_million_url_ids_sharing_a_60_char_prefix_get_distinct_names():
    prefix = "https://images.example.com/collections/2026/summer/originals/"
    assert len(prefix) >= 60
    names = {image_name(f"{prefix}{i}.jpg", 0, "png") for i in range(1_000_000)}
    assert len(names) == 1_000_000


def test_shard_plan_covers_every_row_once_and_is_stable():
    files = ["/in/a.parquet", "/in/sub/b.parquet"]
    rng = np.random.default_rng(0)
    row_samples = [rng.integers(1, 4, size=500), np.full(7, 2)]
    plan = plan_shards(files, row_samples, 100)
    assert plan == plan_shards(files, row_samples, 100)  # same input, same shards, same names
    assert len({s.name for s in plan}) == len(plan)
    for file, samples in zip(files, row_samples):
        mine = [s for s in plan if s.file == file]
        assert [s.start for s in mine] == [0] + [s.stop for s in mine[:-1]] and mine[-1].stop == len(samples)
        assert [s.samples for s in mine] == [int(samples[s.start:s.stop].sum()) for s in mine]
        assert all(s.samples <= 100 + 2 for s in mine[:-1]) and all(s.samples >= 98 for s in mine[:-1])
    moved = plan_shards(["/elsewhere/a.parquet", "/elsewhere/sub/b.parquet"], row_samples, 100)
    assert [s.name for s in moved] == [s.name for s in plan]  # names follow the path under the input root
    assert (default_shard_size(12), default_shard_size(10_000), default_shard_size(10**7)) == (1, 100, 1000)


def _rows(keys: list[tuple[str, int]], shard: str, size: int) -> pa.Table:
    count = len(keys)
    return pa.table({"prompt_id": [k for k, _ in keys], "sample_idx": [i for _, i in keys],
                     "prompt": ["p"] * count, "negative_prompt": [""] * count, "seed": list(range(count)),
                     "image": [f"img-{k}-{i}".encode() for k, i in keys], "nfe": [2] * count,
                     "gen_seconds": [0.1] * count, "error": [""] * count, "shard": [shard] * count,
                     "shard_samples": [size] * count})


@pytest.mark.parametrize("layout", ["webdataset", "files", "parquet"])
def test_sink_assembles_a_shard_from_pieces_of_several_blocks_and_retries(tmp_path, layout):
    out = Storage(str(tmp_path / "out"))
    sink = SampleSink(out, RUN, "png", layout=layout)
    keys = [("a", 0), ("a", 1), ("b", 0)]
    assert sink.write_table(_rows(keys[:2], "s", 3)) == []
    assert sink.write_table(_rows(keys[1:2], "s", 3)) == []  # a retried block: 3 rows listed, 2 distinct
    assert not (tmp_path / "out" / "_shards").exists()
    assert sink.write_table(_rows(keys[2:], "s", 3)) == ["s"]
    record = pq.read_table(tmp_path / "out" / "_shards" / "s.parquet")
    assert list(zip(record["prompt_id"].to_pylist(), record["sample_idx"].to_pylist())) == keys
    assert not (tmp_path / "out" / "_pieces" / "s").exists()
    images = [f"img-{key}-{idx}".encode() for key, idx in keys]
    if layout == "files":
        assert [open(uri, "rb").read() for uri in record["image_uri"].to_pylist()] == images
        assert record["image_offset"].null_count == 3 and not (tmp_path / "out" / "webdataset").exists()
        return
    assert not (tmp_path / "out" / "images").exists()
    if layout == "parquet":
        data = pq.read_table(tmp_path / "out" / "data" / "s.parquet")
        assert [row["bytes"] for row in data["image"].to_pylist()] == images
        assert record["image_offset"].to_pylist() == [0, 1, 2] and sink.images.read_images(record) == images
        return
    tar = (tmp_path / "out" / "webdataset" / "s.tar").read_bytes()
    for image, offset, size in zip(images, record["image_offset"].to_pylist(), record["image_bytes"].to_pylist()):
        assert tar[offset:offset + size] == image  # a ranged read finds the image
    with tarfile.open(tmp_path / "out" / "webdataset" / "s.tar") as archive:  # a standard tar, WebDataset keys
        assert [m.split("_")[1] for m in archive.getnames()] == ["0.png", "0.json", "1.png", "1.json", "0.png",
                                                                 "0.json"]


def _record(out: Storage, shard: str, keys: list[tuple[str, int]], uris: list[str] | None = None) -> None:
    count = len(keys)
    columns = {name: [None] * count for name in METRICS_SCHEMA.names}
    columns.update(prompt_id=[k for k, _ in keys], sample_idx=[i for _, i in keys], shard=[shard] * count,
                   image_uri=uris or [f"{out.uri}/images/{k}_{i}.png" for k, i in keys], attempt=[0] * count,
                   image_bytes=[0] * count)  # a record never has null sizes (scan_records refuses them)
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns, METRICS_SCHEMA), buffer)
    out.write_atomic(out.path("_shards", f"{shard}.parquet"), buffer.getvalue())


def test_rerun_reports_empty_corrupt_and_short_records_by_name(tmp_path):
    out = Storage(str(tmp_path / "out"))
    plan = plan_shards(["/in/a.parquet"], [np.ones(8, dtype=np.int64)], 2)  # 4 shards of 2 samples
    good, empty, corrupt, short = (s.name for s in plan)
    _record(out, good, [("p0", 0), ("p1", 0)])
    (tmp_path / "out" / "_shards" / f"{empty}.parquet").write_bytes(b"")
    (tmp_path / "out" / "_shards" / f"{corrupt}.parquet").write_bytes(b"PAR1 not parquet at all")
    _record(out, short, [("p6", 0)])
    _record(out, "not-in-this-plan", [("x", 0)])
    scan = manifest.scan_records(out, plan)
    assert scan.done == {good: 2} and scan.stale == 1
    assert scan.bad[empty] == "empty file" and scan.bad[corrupt].startswith("unreadable (")
    assert scan.bad[short] == "1 rows, the shard has 2"


def test_finalize_writes_a_dataset_of_parts_and_fails_loudly_on_a_shared_object(tmp_path, monkeypatch):
    out = Storage(str(tmp_path / "out"))
    plan = plan_shards(["/in/a.parquet"], [np.ones(6, dtype=np.int64)], 2)
    for n, shard in enumerate(plan):
        _record(out, shard.name, [(f"p{2 * n}", 0), (f"p{2 * n + 1}", 0)])
    monkeypatch.setattr(manifest, "METRICS_ROWS_PER_FILE", 3)
    record = {"attempts": [{"attempt": 0}]}
    out.write_atomic(out.path("metrics.parquet", "part-00009.parquet"), b"left from an earlier finalize")
    sink = SampleSink(out, {}, "png")
    summary = manifest.finalize(sink, record, plan, 1.0)
    assert (summary.rows, summary.expected, summary.shards_done) == (6, 6, 3)
    assert summary.complete and summary.metrics_uri == f"{out.uri}/metrics.parquet"
    parts = sorted(p.name for p in (tmp_path / "out" / "metrics.parquet").iterdir())
    assert parts == ["part-00000.parquet", "part-00001.parquet"]  # 4 + 2 rows; the stale part is gone
    assert pq.read_table(tmp_path / "out" / "metrics.parquet").num_rows == 6
    assert len(pd.read_parquet(tmp_path / "out" / "metrics.parquet")) == 6

    _record(out, plan[2].name, [("p4", 0), ("p5", 0)], uris=[f"{out.uri}/images/p0_0.png"] * 2)
    with pytest.raises(manifest.OutputCollision, match=r"image_uri='.*p0_0.png'.*\('p0', 0\).*\('p4', 0\)"):
        manifest.finalize(sink, record, plan, 1.0)


def test_a_run_keeps_its_shard_size_and_refuses_another():
    from pipeline.config import JobOptions

    recorded = {"shard_size": 50}
    assert manifest.shard_size(recorded, JobOptions(), 10**6, default_shard_size) == 50
    assert manifest.shard_size(recorded, JobOptions(shard_size=50), 10**6, default_shard_size) == 50
    assert manifest.shard_size(None, JobOptions(), 10**6, default_shard_size) == 1000
    with pytest.raises(manifest.RunConfigMismatch, match="shards of 50 samples.*rerun with --shard-size 50"):
        manifest.shard_size(recorded, JobOptions(shard_size=20), 10**6, default_shard_size)
    assert JobOptions(layout="webdataset").layout == "webdataset"
    with pytest.raises(ValueError, match=r"--webdataset was removed in maskray 0\.1\.0; use --layout both"):
        JobOptions(webdataset=True)
    with pytest.raises(ValueError, match="unknown layout 'tars'; known layouts: both, files, parquet, webdataset"):
        JobOptions(layout="tars")
