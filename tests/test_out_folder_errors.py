"""Issue 49's ``--out`` findings, without Ray: a completion record's ``image_uri`` is read only under ``--out``, and
every malformed file there (record, piece, lock, manifest) gives one line naming the file, what is wrong and what
to do, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from generate_helpers import SINK_RUN, shards, sink_rows

from pipeline.lease import RunLease
from pipeline.manifest import read_manifest, scan_records
from pipeline.partial import assemble_whole_pieces
from pipeline.shards import Shard
from pipeline.sinks.datasink import PIECE_SCHEMA, PIECES, SampleSink
from pipeline.storage import OutFileError, Storage

PLAN = [Shard("s", "prompts.parquet", 0, 2, 3)]  # the shard of ``sink_rows``: 3 samples


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def failed_record(tmp_path: Path, layout: str = "webdataset") -> tuple[SampleSink, Path]:
    """A shard ``s`` whose record holds two good samples and a failed one: a rerun reads the good images back."""
    sink = SampleSink(Storage(str(tmp_path / "out")), SINK_RUN, "png", layout=layout)
    sink.write_table(sink_rows([("a", 0), ("a", 1)]))
    sink.write_table(sink_rows([("b", 0)], error="RuntimeError: CUDA out of memory"))
    return sink, tmp_path / "out" / "_shards" / "s.parquet"


def forge(record: Path, uri: str) -> None:
    table = pq.read_table(record)
    uris = pc.if_else(pc.is_valid(table["image_uri"]), pa.scalar(uri), table["image_uri"])
    pq.write_table(table.set_column(table.schema.get_field_index("image_uri"), "image_uri", uris), record)


# ---------------------------------------------------------------------------------------------------
# 3. record paths are used only under --out


@pytest.mark.parametrize("uri", ["/etc/hostname", "{out}/webdataset/../../../../etc/hostname"])
def test_a_forged_record_path_is_never_read(tmp_path, uri):
    sink, record = failed_record(tmp_path)
    uri = uri.format(out=tmp_path / "out")
    forge(record, uri)
    with pytest.raises(OutFileError) as refused:
        scan_records(sink.storage, PLAN)  # the rerun's check on the driver, before any task reads the images
    assert one_line(refused) == (f"completion record {record}: its image_uri {uri!r} is not under --out "
                                 f"{tmp_path / 'out'}; a rerun would read that file into the output: delete the "
                                 f"record (its shard is generated again)")
    with pytest.raises(ValueError, match="is not under --out"):
        sink.images.read_images(pq.read_table(record))  # and the layout itself never reads it


def test_the_run_report_never_reads_a_forged_metrics_path(tmp_path):
    from jobs.run_report import write_run_report
    from pipeline.sinks.datasink import METRICS_SCHEMA

    out = tmp_path / "out"
    (out / "metrics.parquet").mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"config": {"job": {"prompts": str(tmp_path / "gone"),
                                                                      "layout": "files"}, "model": {"model": "m"}}}))
    row = {name: [None] for name in METRICS_SCHEMA.names}
    row.update(prompt_id=["a"], sample_idx=[0], candidate=[0], image_uri=["/etc/hostname"], image_bytes=[5],
               score=[1.0], kept=[True])
    pq.write_table(pa.table(row, METRICS_SCHEMA), out / "metrics.parquet" / "part-00000.parquet")
    with pytest.raises(OutFileError) as refused:
        write_run_report(str(out))
    assert one_line(refused).startswith(f"{out}/metrics.parquet has a row whose image_uri '/etc/hostname' is not "
                                        f"under --out {out}; the report reads only images under --out")


def test_record_paths_under_out_are_read(tmp_path):
    sink, record = failed_record(tmp_path)
    found = scan_records(sink.storage, PLAN)
    assert found.failed == {"s"}
    assert sink.images.read_images(pq.read_table(record))[:2] == [b"img-a-0", b"img-a-1"]


# ---------------------------------------------------------------------------------------------------
# 4. malformed files under --out: one line naming the file, what is wrong, what to do


def test_a_record_without_error_column_or_with_null_sizes_is_redone_with_a_reason(tmp_path):
    sink, record = failed_record(tmp_path)
    pq.write_table(pq.read_table(record).drop_columns(["error"]), record)
    assert scan_records(sink.storage, PLAN).bad == {
        "s": "missing column(s) ['error'] (not a maskray completion record)"}
    table = pq.read_table(tmp_path / "out" / "_shards" / "s.parquet")
    sizes = pa.array([None] * table.num_rows, pa.int64())
    pq.write_table(table.set_column(table.schema.get_field_index("image_bytes"), "image_bytes", sizes)
                   .append_column("error", pa.array([None] * table.num_rows, pa.string())), record)
    assert scan_records(sink.storage, PLAN).bad == {
        "s": "holding null image_bytes values (not a maskray completion record)"}


def test_a_garbage_or_null_piece_is_named_with_the_fix(tmp_path):
    sink = SampleSink(Storage(str(tmp_path / "out")), SINK_RUN, "png", layout="webdataset")
    sink.write_table(sink_rows([("a", 0)]))  # one piece of three samples: the shard stays partial
    pieces = tmp_path / "out" / PIECES / "s"
    garbage = pieces / "0123456789abcdef0123-2.parquet"
    garbage.write_bytes(b"garbage")
    with pytest.raises(OutFileError) as refused:
        assemble_whole_pieces(sink, {"s": 3})
    assert one_line(refused) == (f"piece {garbage} under --out holds not a Parquet file, so it is not a piece a "
                                 f"maskray run wrote; delete it (its samples are generated again)")
    piece = pa.table({"prompt_id": ["b", "c"], "sample_idx": [0, 0], "image_bytes": pa.array([None, 4], pa.int64())})
    pq.write_table(piece.cast(pa.schema([PIECE_SCHEMA.field(n) for n in piece.column_names])), garbage)
    with pytest.raises(OutFileError, match=r"piece .*-2.parquet under --out holds null image_bytes values, .*; "
                                           r"delete it"):
        assemble_whole_pieces(sink, {"s": 3})


@pytest.mark.parametrize("content, problem", [
    ("[1, 2]", "a JSON list, not a maskray lease"),
    ('"mine"', "a JSON str, not a maskray lease"),
    ('{"pid": 1, "heartbeat": "yesterday"}', "a lease whose heartbeat is a str, not a time in seconds"),
])
def test_a_malformed_lock_is_named_and_force_replaces_it(tmp_path, content, problem):
    storage = Storage(str(tmp_path / "out"))
    lock = tmp_path / "out" / "_lock.json"
    lock.parent.mkdir()
    lock.write_text(content)
    with pytest.raises(OutFileError) as refused:
        RunLease(storage, log=lambda _: None).acquire()
    assert one_line(refused) == f"the lock {lock} is {problem}; delete it, or rerun with --force to replace it"
    with RunLease(storage, force=True, log=lambda _: None):
        assert isinstance(json.loads(lock.read_text())["heartbeat"], float)
    assert not lock.exists()


def test_a_lock_that_is_a_folder_and_a_broken_manifest_are_named(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    (tmp_path / "out" / "_lock.json").mkdir(parents=True)
    with pytest.raises(OutFileError) as refused:
        RunLease(storage, log=lambda _: None).acquire()
    assert one_line(refused).startswith(f"the lock {tmp_path / 'out' / '_lock.json'} cannot be read")
    assert str(refused.value).endswith("delete it")
    (tmp_path / "out" / "manifest.json").write_text("[]")
    with pytest.raises(OutFileError, match=r"manifest.json is a JSON list, not an object; restore it, or choose a "
                                           r"new --out"):
        read_manifest(storage)


def test_the_cli_gives_one_line_for_a_malformed_lock(tmp_path, capsys):
    from jobs.cli import main

    shards(tmp_path / "prompts", count=1, per_shard=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_lock.json").write_text("[]")
    assert main(["generate", "--prompts", str(tmp_path / "prompts"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"maskray generate: error: the lock {tmp_path / 'out' / '_lock.json'} is a JSON list, not a maskray lease; "
        f"delete it, or rerun with --force to replace it")
