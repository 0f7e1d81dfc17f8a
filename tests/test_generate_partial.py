"""A rerun of ``maskray generate`` keeps what a partial shard already holds (``pipeline.partial``): the good samples
of a record with failures, and the pieces a crash left. Without Ray: the sink's assembly keeps a sample's good row
over its failed one and reading a partial shard lists what it keeps. On real Ray (loopback, 2 CPUs, tiny model):
a missing init image fixed between runs costs only its own samples; a crash's pieces are assembled or completed.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from generate_helpers import SINK_RUN, check_exactly_once, config, sink_rows
from PIL import Image

from pipeline.partial import assemble_whole_pieces, keep_written_samples, record_piece
from pipeline.prompts import expand_samples
from pipeline.shards import read_shards
from pipeline.sinks.datasink import PIECES, SampleSink, piece_name
from pipeline.storage import Storage


def test_assembly_keeps_the_good_row_of_a_sample_generated_again_and_a_partial_shard_lists_it(tmp_path):
    out = Storage(str(tmp_path / "out"))
    sink = SampleSink(out, SINK_RUN, "png", layout="webdataset")
    sink.write_table(sink_rows([("a", 0), ("a", 1)]))
    sink.write_table(sink_rows([("b", 0)], error="RuntimeError: CUDA out of memory"))  # 3 listed: assembled
    record = pq.read_table(tmp_path / "out" / "_shards" / "s.parquet")
    assert record["error"].to_pylist() == [None, None, "RuntimeError: CUDA out of memory"]

    # the rerun's read task: the record's good rows become a piece, with their image bytes from the old tar
    kept = keep_written_samples(sink, "s", from_record=True, keep_failed=False)
    assert kept == {"a": [[0, 0], [1, 0]]}
    assert keep_written_samples(sink, "s", from_record=True, keep_failed=True) == {"a": [[0, 0], [1, 0]]}
    prompts = pa.table({"prompt_id": ["a", "b"], "prompt": ["p", "p"], "num_images": [2, 1]})
    pq.write_table(prompts, tmp_path / "prompts.parquet")
    descriptor = pa.table({"name": ["s"], "file": [str(tmp_path / "prompts.parquet")], "start": [0], "stop": [2],
                           "samples": [3], "resume": ["record"]})
    rows = read_shards(descriptor, storage=Storage(str(tmp_path)), columns=["prompt_id", "prompt", "num_images"],
                       sink=sink)
    assert rows["kept_samples"].to_pylist() == [[[0, 0], [1, 0]], []]
    batch = {name: rows[name].to_numpy(zero_copy_only=False) for name in rows.column_names}
    todo = expand_samples(batch, run_seed=0, num_images=1)
    assert list(zip(todo["prompt_id"], todo["sample_idx"])) == [("b", 0)] and "kept_samples" not in todo

    sink.write_table(sink_rows([("b", 0)]))  # the failed sample, generated again, completes the shard
    record = pq.read_table(tmp_path / "out" / "_shards" / "s.parquet")
    assert record["error"].null_count == 3 and not (tmp_path / "out" / PIECES / "s").exists()
    tar = (tmp_path / "out" / "webdataset" / "s.tar").read_bytes()
    images = [tar[o:o + n] for o, n in zip(record["image_offset"].to_pylist(), record["image_bytes"].to_pylist())]
    assert images == [b"img-a-0", b"img-a-1", b"img-b-0"]


def test_partial_shards_over_the_s3_protocol(s3):
    import s3fs

    s3fs.S3FileSystem(**s3).mkdir("bucket")
    out = Storage("s3://bucket/out", s3)
    sink = SampleSink(out, SINK_RUN, "png", layout="webdataset")
    sink.write_table(sink_rows([("a", 0), ("a", 1)]))
    sink.write_table(sink_rows([("b", 0)], error="RuntimeError: CUDA out of memory"))
    assert out.exists(out.path("_shards", "s.parquet"))

    # the good rows' images come back from the tar by ranged reads and land in a piece
    assert keep_written_samples(sink, "s", from_record=True, keep_failed=False) == {"a": [[0, 0], [1, 0]]}
    (path,) = out.list(out.path(PIECES, "s"), ".parquet")
    assert pq.read_table(io.BytesIO(out.read(path)))["image"].to_pylist() == [b"img-a-0", b"img-a-1"]

    # the driver's pass: pieces of an unplanned shard go, a partial shard's stay for its task
    files = SampleSink(out, SINK_RUN, "png", layout="files")  # a layout that keeps no image bytes in its pieces
    orphan = record_piece(files, pq.read_table(io.BytesIO(out.read(out.path("_shards", "s.parquet")))))
    out.write_table(out.path(PIECES, "gone", piece_name(orphan)), orphan)
    assert out.folders(out.path(PIECES)) == ["gone", "s"]
    assert assemble_whole_pieces(sink, {"s": 3}) == ["s"] and out.folders(out.path(PIECES)) == ["s"]


def _png(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


def _tar_images(path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.name.endswith(".png")}


def test_a_fixed_init_image_regenerates_only_its_samples(ray_local, tmp_path):
    from pipeline.generate import run_generate

    inputs, out = tmp_path / "inputs", tmp_path / "out"
    _png(inputs / "images" / "a.png", 0)
    ids = ["plain-0", "plain-1", "img2img", "late"]
    pq.write_table(pa.table({"prompt_id": ids, "prompt": [f"shape {i}" for i in ids],
                             "init_image": pa.array([None, None, "images/a.png", "images/late.png"], pa.string())}),
                   inputs / "prompts.parquet")
    cfg = config(str(inputs / "prompts.parquet"), str(out), steps=4, num_images=2, shard_size=8,
                 layout="webdataset")
    first = run_generate(cfg, log=lambda _: None)
    assert (first.rows, first.errors, first.shards) == (8, 2, 1)  # "late" has no image yet
    (record_path,) = (out / "_shards").glob("*.parquet")
    before = pq.read_table(record_path)
    old_images = _tar_images(out / "webdataset" / f"{record_path.stem}.tar")
    assert len(old_images) == 6

    _png(inputs / "images" / "late.png", 1)  # the user adds the missing image and reruns
    lines: list[str] = []
    second = run_generate(cfg, log=lines.append)
    assert (second.rows, second.errors, second.generated) == (8, 0, 2)
    assert any("its failed samples are generated again" in line for line in lines)
    assert any("1 partly written (their written samples are kept)" in line for line in lines)
    after = pq.read_table(record_path)
    check_exactly_once(after, ids, 2)
    attempts = dict(zip(zip(after["prompt_id"].to_pylist(), after["sample_idx"].to_pylist()),
                        after["attempt"].to_pylist()))
    assert attempts == {(p, i): 1 if p == "late" else 0 for p in ids for i in range(2)}  # attempts count from 0
    kept = before.filter(pc.is_null(before["error"])).drop_columns(["image_uri", "image_offset", "written_at"])
    assert after.filter(pc.not_equal(after["prompt_id"], "late")).drop_columns(
        ["image_uri", "image_offset", "written_at"]).equals(kept)  # kept rows: their metrics as first written
    new_images = _tar_images(out / "webdataset" / f"{record_path.stem}.tar")
    assert len(new_images) == 8 and all(new_images[name] == data for name, data in old_images.items())
    assert not (out / PIECES).exists()


def test_a_crash_s_pieces_are_assembled_or_completed(ray_local, tmp_path):
    from pipeline.generate import run_generate

    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    ids = [f"p{i}" for i in range(8)]
    pq.write_table(pa.table({"prompt_id": ids, "prompt": [f"shape {i}" for i in ids]}), inputs / "prompts.parquet")
    cfg = config(str(inputs / "prompts.parquet"), str(out), steps=4, shard_size=4)
    first = run_generate(cfg, log=lambda _: None)
    assert (first.rows, first.errors, first.shards) == (8, 0, 2)
    storage = Storage(str(out))
    sink = SampleSink(storage, {}, "png")  # the run's layout, files: its pieces carry no image bytes
    whole, half = sorted((out / "_shards").glob("*.parquet"))
    records = {path.stem: pq.read_table(path) for path in (whole, half)}
    written = {uri: os.stat(uri).st_mtime_ns for table in records.values() for uri in table["image_uri"].to_pylist()}

    # what a crash leaves: one shard's pieces hold all its rows (the crash came before its record), the
    # other's half of them; neither shard has a record
    for path, rows in ((whole, records[whole.stem]), (half, records[half.stem].slice(0, 2))):
        path.unlink()
        for part in (rows.slice(0, 1), rows.slice(1)):
            piece = record_piece(sink, part)
            storage.write_table(storage.path(PIECES, path.stem, piece_name(piece)), piece)
    lines: list[str] = []
    second = run_generate(cfg, log=lines.append)
    assert (second.rows, second.errors, second.generated) == (8, 0, 2)  # the half shard's other half
    assert any("1 shard(s) (4 samples) already done" in line and "1 partly written" in line for line in lines)
    check_exactly_once(pq.read_table(out / "metrics.parquet"), ids, 1)
    assert pq.read_table(whole).drop_columns(["written_at"]).equals(records[whole.stem].drop_columns(["written_at"]))
    rewritten = pq.read_table(half)
    assert rewritten.slice(0, 2).equals(records[half.stem].slice(0, 2))  # kept as written, attempt 0
    assert rewritten["attempt"].to_pylist() == [0, 0, 1, 1]
    kept = records[half.stem]["image_uri"].to_pylist()[:2] + records[whole.stem]["image_uri"].to_pylist()
    assert all(os.stat(uri).st_mtime_ns == written[uri] for uri in kept)  # kept images were not written again
    assert not (out / PIECES).exists()
