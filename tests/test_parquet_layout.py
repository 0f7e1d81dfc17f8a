"""Layout ``parquet`` (``pipeline.sinks.parquet``): Parquet shards with a Hugging Face ``Image`` column.

Without Ray: a shard assembled from pieces, a partial shard's images read back from inside the Parquet file, the
dataset card. On real Ray (loopback, tiny model): the files load with the real ``datasets`` library (in memory
and streaming) as PIL images equal to a ``files`` run's images of the same prompts and seeds, and read with
``ray.data.read_parquet`` and DuckDB.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
from generate_helpers import SINK_RUN, check_exactly_once, config, shards, sink_rows
from PIL import Image

from pipeline import manifest
from pipeline.partial import keep_written_samples
from pipeline.shards import default_shard_size
from pipeline.sinks.datasink import PIECES, SampleSink
from pipeline.sinks.parquet import ROW_GROUP_BYTES, dataset_card, rows_per_group
from pipeline.sinks.registry import SinkBuilder
from pipeline.storage import Storage


def test_a_shard_file_holds_the_good_images_by_row_and_a_partial_shard_reads_them_back(tmp_path):
    out = Storage(str(tmp_path / "out"))
    sink = SampleSink(out, SINK_RUN, "png", layout="parquet")
    sink.write_table(sink_rows([("a", 0), ("a", 1)]))
    sink.write_table(sink_rows([("b", 0)], error="RuntimeError: CUDA out of memory"))  # 3 listed: assembled
    record = pq.read_table(tmp_path / "out" / "_shards" / "s.parquet")
    shard_file = tmp_path / "out" / "data" / "s.parquet"
    assert record["image_uri"].to_pylist() == [out.url("data", "s.parquet")] * 2 + [None]
    assert record["image_offset"].to_pylist() == [0, 1, None]  # the row in the shard file
    table = pq.read_table(shard_file)
    images = table["image"].to_pylist()
    assert [row["bytes"] for row in images] == [b"img-a-0", b"img-a-1"]
    assert [row["path"][-6:] for row in images] == ["_0.png", "_1.png"] and table["prompt_id"].to_pylist() == ["a"] * 2
    assert b"huggingface" in table.schema.metadata

    # the rerun's read task: the record's good rows become a piece, their images read from inside the file
    assert keep_written_samples(sink, "s", from_record=True, keep_failed=False) == {"a": [[0, 0], [1, 0]]}
    (piece,) = out.list(out.path(PIECES, "s"), ".parquet")
    assert pq.read_table(io.BytesIO(out.read(piece)))["image"].to_pylist() == [b"img-a-0", b"img-a-1"]
    sink.write_table(sink_rows([("b", 0)]))  # the failed sample, generated again, completes the shard
    table = pq.read_table(shard_file)
    assert [row["bytes"] for row in table["image"].to_pylist()] == [b"img-a-0", b"img-a-1", b"img-b-0"]

    # a file of a shard without record (its writer crashed before the record) goes at finalize
    (tmp_path / "out" / "data" / "gone.parquet").write_bytes(b"half")
    sink.clean_up({"s"})
    assert sorted(p.name for p in (tmp_path / "out" / "data").iterdir()) == ["s.parquet"]


def test_the_size_rules_and_the_card():
    assert rows_per_group([1_300_000] * 500) == ROW_GROUP_BYTES // 1_300_000 == 51
    assert rows_per_group([]) >= 1 and rows_per_group([10 << 30]) == 1
    most = SinkBuilder.config_type("parquet").default_max_shard_size
    assert default_shard_size(10**6, most) * 1_000_000 <= 0.55e9  # 500 PNGs of ~1 MB: ~0.5 GB per file
    card = dataset_card({"config_hash": "abc", "config": {"model": {"model": "tiny"}, "job": {"seed": 3}},
                         "packages": {"maskray": "9.9"}, "counts": {"rows": 4, "errors": 0}})
    import yaml

    header = yaml.safe_load(card.split("---")[1])
    assert header["configs"][0]["data_files"] == [{"split": "train", "path": "data/*.parquet"}]
    assert {"name": "image", "dtype": "image"} in header["dataset_info"]["features"]
    assert "maskray 9.9" in card and '"seed": 3' in card


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_datasets_ray_and_duckdb_read_a_parquet_run(ray_local, tmp_path):
    import datasets
    import duckdb
    import ray

    from pipeline.generate import run_generate

    ids = shards(tmp_path / "prompts", count=1, per_shard=3)
    parquet_run = config(str(tmp_path / "prompts"), str(tmp_path / "out"), steps=2, num_images=2, shard_size=4,
                         layout="parquet")
    result = run_generate(parquet_run, log=lambda _: None)
    assert (result.rows, result.errors, result.shards_done) == (6, 0, 2)
    check_exactly_once(pq.read_table(tmp_path / "out" / "metrics.parquet"), ids, 2)
    files_run = config(str(tmp_path / "prompts"), str(tmp_path / "files"), steps=2, num_images=2)
    run_generate(files_run, log=lambda _: None)
    metrics = pq.read_table(tmp_path / "files" / "metrics.parquet").to_pylist()
    expected = {(m["prompt_id"], m["sample_idx"]): _pixels(open(m["image_uri"], "rb").read()) for m in metrics}

    data_files = str(tmp_path / "out" / "data" / "*.parquet")
    cache = str(tmp_path / "hf-cache")  # datasets caches a local folder by its name: never reuse another test's
    loaded = datasets.load_dataset("parquet", data_files=data_files, split="train", cache_dir=cache)
    assert loaded.features["image"] == datasets.Image() and len(loaded) == 6
    for row in loaded:
        assert isinstance(row["image"], Image.Image)
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), expected[row["prompt_id"], row["sample_idx"]])
    streamed = list(datasets.load_dataset("parquet", data_files=data_files, split="train", streaming=True,
                                             cache_dir=cache))
    assert sorted((r["prompt_id"], r["sample_idx"]) for r in streamed) == sorted(expected)
    assert all(isinstance(r["image"], Image.Image) for r in streamed)
    card_loaded = datasets.load_dataset(str(tmp_path / "out"), split="train", cache_dir=cache)  # the card finds data/
    assert len(card_loaded) == 6

    rows = ray.data.read_parquet(str(tmp_path / "out" / "data")).take_all()
    assert sorted((r["prompt_id"], r["sample_idx"]) for r in rows) == sorted(expected)
    count, mean_len = duckdb.sql(f"select count(*), avg(octet_length(image.bytes)) from '{data_files}'").fetchall()[0]
    assert count == 6 and mean_len > 0
    assert manifest.read_manifest(Storage(str(tmp_path / "out")))["status"] == "complete"
