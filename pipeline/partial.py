"""Partial shards: what a rerun keeps of a shard that has no good completion record.

A shard is redone when a crash left it without a record (its written rows are *pieces* under
``_pieces/<shard>/``, ``pipeline.sinks.datasink``) or when its record holds failed samples. Either way most of its samples
may already be written, and redoing them costs GPU time for images the run already has (a shard is 1,000
samples at scale, and one unreadable ``init_image`` fails the same sample on every rerun). So a rerun keeps them:

1. On the driver, before Ray starts work, ``assemble_whole_pieces`` assembles every planned shard whose pieces
   are already whole (a crash between the last piece and the record) and drops the pieces of shards no longer
   planned. What is left are pieces of shards in flight at a crash: a few per actor, never a run's worth.
2. In the task that reads a shard's prompt rows, ``keep_written_samples`` turns the good rows of its
   failed-sample record into a piece (with their image bytes when the layout builds its output from them, read
   back from where the layout put them: the old tar or image file), then lists the shard's pieces and returns, per
   ``prompt_id``, the (sample index, candidate) pairs they hold: ``pipeline.prompts.expand_samples`` leaves those out. Failed rows are not kept (unless
   ``--keep-failed``), so a failed sample is generated again and the sink's assembly prefers its good row.

The sink assembles a shard when its pieces hold every sample, old pieces and new alike, so a resumed shard ends
with one record as if it had been written in one go; its kept rows keep the ``attempt`` that generated them.
Work here grows with the resumed shards, each read once by its own task, never with the done samples on the
driver.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.sinks.datasink import METRICS_SCHEMA, PIECE_SCHEMA, PIECES, SHARDS, SampleSink, piece_name, read_piece


def assemble_whole_pieces(sink: SampleSink, planned: dict[str, int]) -> list[str]:
    """Assemble the shards whose pieces already hold every sample; remove the pieces of unplanned shards.

    Args:
        sink: the run's sink (its storage, image format and layout).
        planned: shard name -> its sample count, for every shard of this run's plan.

    Returns:
        The shards that still have pieces (partial: their tasks keep what the pieces hold).
    """
    storage = sink.storage
    partial = []
    for shard in storage.folders(storage.path(PIECES)):
        if shard not in planned:
            storage.remove(storage.path(PIECES, shard))  # another input or shard size: nothing to keep
        elif not sink.assemble(shard, planned[shard]):
            partial.append(shard)
    return partial


def keep_written_samples(sink: SampleSink, shard: str, *, from_record: bool,
                         keep_failed: bool) -> dict[str, list[list[int]]]:
    """The samples of ``shard`` already written, as ``prompt_id -> [sample_idx, candidate] pairs``, which its rerun
    skips (candidate 0 unless ``--best-of``).

    Args:
        sink: the run's sink (its ``--out`` root and layout).
        shard: the shard's name.
        from_record: the shard's record holds failed samples: its good rows become a piece first.
        keep_failed: failed rows count as written (``--keep-failed``).
    """
    storage = sink.storage
    if from_record:
        record = pq.read_table(io.BytesIO(storage.read(storage.path(SHARDS, f"{shard}.parquet"))),
                               schema=METRICS_SCHEMA)
        good = record.filter(pc.is_null(record["error"]))
        if good.num_rows:
            piece = record_piece(sink, good)
            storage.write_table(storage.path(PIECES, shard, piece_name(piece)), piece)
    paths = storage.list(storage.path(PIECES, shard), ".parquet")
    kept: dict[str, set[tuple[int, int]]] = {}
    for path, blob in zip(paths, storage.read_many(paths)):
        rows = read_piece(storage, path, blob, ["prompt_id", "sample_idx", "candidate", "error"])
        if not keep_failed:
            rows = rows.filter(pc.is_null(rows["error"]))
        for prompt_id, sample_idx, candidate in zip(rows["prompt_id"].to_pylist(), rows["sample_idx"].to_pylist(),
                                                    rows["candidate"].to_pylist()):
            kept.setdefault(prompt_id, set()).add((sample_idx, candidate or 0))
    return {prompt_id: [list(key) for key in sorted(samples)] for prompt_id, samples in kept.items()}


def record_piece(sink: SampleSink, record: pa.Table) -> pa.Table:
    """Rows of a completion record as a piece: its metrics columns, plus the image bytes when the layout needs them
    to assemble the shard (read back by the layout, e.g. from the image files or the shard's old tar)."""
    images = sink.images.read_images(record) if sink.carries_images else [None] * record.num_rows
    return (record.drop_columns(["image_uri", "image_offset", "kept"])
            .append_column("image", pa.array(images, pa.binary())).select(PIECE_SCHEMA.names).cast(PIECE_SCHEMA))
