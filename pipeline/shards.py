"""Shards: the unit of output, completion and resume of a ``maskray generate`` run.

A shard is a range of prompt rows of one input file holding about ``shard_size`` samples, cut from the
file's row order alone (img2dataset's design: shard = input file + row range). Its name is a digest of the
file's path under the input root plus the row range, so the same input and shard size give the same shards
on every rerun: a rerun lists the completion records ``_shards/*.parquet`` and skips whole shards; of a shard
in flight at a crash, or whose record holds failed samples, it keeps the samples already written
(``pipeline.partial``). Nothing proportional to the done samples is built on the driver or shipped to tasks, and
a crash loses at most the samples in flight that were not yet written.

Default shard size: ``ceil(samples / 100)`` clamped to [1, 1000], so a laptop run of a few prompts still
records progress sample by sample, and a run of 10^5 samples or more gets shards of 1,000 samples (a
WebDataset tar of 1,000 Meissonic 1024x1024 PNGs is about 1 GB, the size WebDataset recommends; a 10^7-sample
run leaves 10^4 records, which a rerun reads in seconds). A run keeps the shard size it started with
(recorded in ``manifest.json``).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.partial import keep_written_samples
from pipeline.prompts import prompt_ids
from pipeline.sinks.datasink import SampleSink
from pipeline.storage import Storage

MAX_DEFAULT_SHARD_SIZE = 1000
SHARDS_PER_RUN = 100  # a small run still gets this many shards (records), so progress is visible


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of prompt file ``file`` (a path inside the prompts' filesystem)."""

    name: str
    file: str
    start: int
    stop: int
    samples: int


def default_shard_size(samples: int, most: int = MAX_DEFAULT_SHARD_SIZE) -> int:
    """``ceil(samples / 100)`` within [1, ``most``] (see the module docstring; the layout's
    ``default_max_shard_size`` gives ``most``: 500 for Parquet files of about 0.5 GB)."""
    return int(min(most, max(1, -(-samples // SHARDS_PER_RUN))))


def plan_shards(files: list[str], row_samples: list[np.ndarray], shard_size: int) -> list[Shard]:
    """Cut every file's rows into shards of about ``shard_size`` samples.

    A row goes to shard ``k`` of its file when the file's samples before it number ``k * shard_size`` or
    more and less than ``(k + 1) * shard_size``, so a shard holds ``shard_size`` samples give or take one
    row's images, and the cut depends only on the file and the shard size.

    Args:
        files: the prompt files, as ``scan_prompts`` found them.
        row_samples: per file, the samples of each row (its ``num_images``).
        shard_size: samples per shard, >= 1.
    """
    root = os.path.commonpath([os.path.dirname(f) for f in files]) if files else ""
    shards = []
    for file, samples in zip(files, row_samples):
        tag = hashlib.sha256(os.path.relpath(file, root).encode()).hexdigest()[:16]
        before = np.cumsum(samples) - samples
        cuts = (np.flatnonzero(np.diff(before // shard_size)) + 1).tolist()
        ends = np.concatenate([[0], np.cumsum(samples)])
        for start, stop in zip([0, *cuts], [*cuts, len(samples)]):
            shards.append(Shard(f"{tag}-{start:010d}-{stop:010d}", file, start, stop,
                                int(ends[stop] - ends[start])))
    return shards


def read_shards(batch: pa.Table, *, storage: Storage, columns: list[str], sink: SampleSink | None = None,
                keep_failed: bool = False) -> pa.Table:
    """Shard descriptors (``name``, ``file``, ``start``, ``stop``, ``samples``, ``resume``) -> their prompt rows.

    Adds ``shard`` and ``shard_samples`` to each row, for the sink, and ``kept_samples``: the ``[sample_idx,
    candidate]`` pairs of the row that a partial shard already holds under ``sink``'s ``--out`` (``resume`` is ``"pieces"`` or
    ``"record"``; see ``pipeline.partial``), which ``expand_samples`` leaves out. Makes relative ``init_image`` and
    ``mask_image`` values absolute (see :func:`resolve_images`). Reads only the row groups that overlap the
    range, so prompt files written with row groups of about a shard (or smaller) are read once in total.
    """
    tables = []
    for shard in batch.to_pylist():
        table = resolve_images(read_rows(storage, shard["file"], shard["start"], shard["stop"], columns),
                               storage, shard["file"])
        count = table.num_rows
        kept: dict[str, list[list[int]]] = {}
        if shard.get("resume") and sink is not None:
            kept = keep_written_samples(sink, shard["name"], from_record=shard["resume"] == "record",
                                        keep_failed=keep_failed)
        rows_kept = [kept.get(prompt_id, []) for prompt_id in prompt_ids(table)] if kept else [[]] * count
        tables.append(table.append_column("shard", pa.array([shard["name"]] * count, pa.string()))
                      .append_column("shard_samples", pa.array([shard["samples"]] * count, pa.int64()))
                      .append_column("kept_samples", pa.array(rows_kept, pa.list_(pa.list_(pa.int64())))))
    return pa.concat_tables(tables)


def resolve_images(table: pa.Table, storage: Storage, file: str) -> pa.Table:
    """``table`` with its ``init_image`` and ``mask_image`` paths as absolute paths or URIs.

    A value with a scheme (``s3://...``) or an absolute local path is kept; a relative one is taken relative
    to the folder of ``file``, in the prompts' filesystem, so a prompt table and its images move together.
    Null and '' stay as they are (a plain generation, or no mask).
    """
    for name in ("init_image", "mask_image"):
        if name not in table.column_names:
            continue
        folder = posixpath.dirname(file)
        values = [_resolve(v, storage, folder) if v else v for v in table[name].to_pylist()]
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return table


def _resolve(value: str, storage: Storage, folder: str) -> str:
    if "://" in value or value.startswith("/"):
        return value
    path = posixpath.normpath(posixpath.join(folder, value))
    return path if storage.local else storage.fs.unstrip_protocol(path)


def read_rows(storage: Storage, file: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows ``[start, stop)`` of one Parquet file, reading only the row groups that hold them."""
    with storage.fs.open(file, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        groups = [g for g in range(len(sizes)) if bounds[g] < stop and bounds[g + 1] > start]
        table = parquet.read_row_groups(groups, columns=columns)
    return table.slice(start - int(bounds[groups[0]]), stop - start)
