"""``SampleSink``: the Ray Data ``Datasink`` that writes images, WebDataset shards and shard completion records.

Layout under ``--out`` (local folder or object-store prefix), for a run cut into shards (``pipeline.shards``)::

    images/<slug>-<sha256>_<sample_idx>.<ext>   one file per sample (layout files or both)
    webdataset/<shard>.tar                      one WebDataset tar per shard (layout webdataset or both)
    _shards/<shard>.parquet                     metrics rows of one whole shard: its completion record
    _pieces/<shard>/<rows hash>-<n>.parquet     rows of a shard written so far (removed once the shard is whole)
    metrics.parquet/, manifest.json             written by ``pipeline.manifest.finalize`` at the end

Ray Data hands a write task whatever rows arrive (a block may hold the end of one shard and the start of
the next), so every write task writes its rows' images, then one *piece* per shard it touched, then lists
that shard's pieces. The task whose piece brings the listed count to the shard's size assembles the shard:
it reads the pieces, writes the tar, then the record (atomically), then drops the pieces. Whichever piece
lands last, its writer lists after every other piece is on storage, so some writer always sees the whole
shard (a retried task only adds duplicate rows, which assembly drops). A record on storage therefore
means the shard's images and tar are complete: resume trusts records, and a rerun completes the shards a crash
left in pieces around the rows they hold (``pipeline.partial``). When a sample is written twice, once failed and
once good (a failure generated again), assembly keeps the good row.

Names derive from content keys, never from Ray's write UUID or task index (docs/ray-notes.md §4), so a
retried task or a rerun overwrites instead of duplicating. ``prompt_id`` is user data: ``image_name`` slugs it for reading and
appends its full SHA-256, so ``../x`` or ``a/b`` can never leave ``images/`` and two ids never share a name.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from collections.abc import Iterable
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from pipeline.storage import Storage

IMAGES, SHARDS, PIECES, WEBDATASET = "images", "_shards", "_pieces", "webdataset"
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
SLUG_CHARS = 48
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
Layout = Literal["files", "webdataset", "both"]

# The metrics table, one row per (prompt_id, sample_idx); null score when no scorer ran, null error when OK.
# ``image_uri`` is the image file, or the shard's tar in the webdataset layout, where ``image_offset`` and
# ``image_bytes`` locate the image inside it (a ranged read). ``init_image``, ``mask_image`` and ``strength``
# are the edit inputs of the row (resolved URIs; null for a plain generation and in records of older runs,
# which read back with these columns null).
METRICS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("sample_idx", pa.int64()), ("prompt", pa.string()),
    ("negative_prompt", pa.string()), ("seed", pa.int64()), ("init_image", pa.string()), ("mask_image", pa.string()),
    ("strength", pa.float64()), ("shard", pa.string()), ("image_uri", pa.string()),
    ("image_offset", pa.int64()), ("image_bytes", pa.int64()), ("model", pa.string()),
    ("quantization", pa.string()), ("sampler", pa.string()), ("sampler_hash", pa.string()),
    ("config_hash", pa.string()), ("scorer", pa.string()), ("score", pa.float64()), ("nfe", pa.int64()),
    ("gen_seconds", pa.float64()), ("error", pa.string()), ("attempt", pa.int64()),
    ("written_at", pa.timestamp("ms", tz="UTC")),
])
# A piece: the metrics columns known before assembly, plus the encoded image when a tar is to be built.
PIECE_SCHEMA = pa.schema([f for f in METRICS_SCHEMA if f.name not in ("image_uri", "image_offset")]
                         + [pa.field("image", pa.binary())])
RUN_COLUMNS = ("model", "quantization", "sampler", "sampler_hash", "config_hash", "scorer", "attempt")


def image_name(prompt_id: str, sample_idx: int, image_format: str) -> str:
    """A file name that stays inside ``images/`` whatever ``prompt_id`` holds, distinct for distinct ids.

    The id's first 48 characters, runs outside ``[A-Za-z0-9._-]`` replaced by ``-`` and no leading dots,
    give a readable slug; the full SHA-256 of the id (64 hex digits, no truncation) keeps distinct ids
    distinct even when they share a long prefix (URLs) or differ only in characters the slug drops.
    """
    slug = UNSAFE.sub("-", prompt_id[:SLUG_CHARS]).strip(".-") or "prompt"
    digest = hashlib.sha256(prompt_id.encode()).hexdigest()
    return f"{slug}-{digest}_{int(sample_idx)}.{EXTENSIONS[image_format]}"


def rows_id(prompt_ids: Iterable[str], sample_idx: Iterable[int]) -> str:
    """20 hex digits of SHA-256 over sorted sample keys: the same rows give the same piece name."""
    keys = sorted(f"{p}\x00{int(i)}" for p, i in zip(prompt_ids, sample_idx))
    return hashlib.sha256("\x01".join(keys).encode()).hexdigest()[:20]


def piece_name(piece: pa.Table) -> str:
    """``<rows_id>-<rows>.parquet``: the same rows give the same name, and a listing counts rows without reads."""
    return f"{rows_id(piece['prompt_id'].to_pylist(), piece['sample_idx'].to_pylist())}-{piece.num_rows}.parquet"


class SampleSink(Datasink[int]):
    """Writes each block's images and pieces, and assembles every shard it completes.

    Args:
        storage: the ``--out`` root.
        run: constant metrics columns of this run (``RUN_COLUMNS``).
        image_format: ``png``, ``webp`` or ``jpeg`` (the file extension).
        layout: ``files`` (one image file per sample), ``webdataset`` (one tar per shard) or ``both``.
        rows_per_write: rows Ray Data gathers for one write task (the shard size: about one piece per shard
            and per task, instead of one per generator batch).

    Rows must carry ``shard`` (the shard's name) and ``shard_samples`` (its size) besides the generator's
    and scorer's columns.
    """

    def __init__(self, storage: Storage, run: dict, image_format: str, layout: Layout = "files",
                 rows_per_write: int | None = None):
        if layout not in ("files", "webdataset", "both"):
            raise ValueError(f"unknown layout {layout!r}; choose files, webdataset or both")
        self.storage, self.run, self.image_format, self.layout = storage, dict(run), image_format, layout
        self.rows_per_write = rows_per_write

    @property
    def min_rows_per_write(self) -> int | None:
        return self.rows_per_write

    @property
    def files(self) -> bool:
        return self.layout in ("files", "both")

    @property
    def tars(self) -> bool:
        return self.layout in ("webdataset", "both")

    def get_name(self) -> str:
        return "SampleSink"

    def write(self, blocks: Iterable[Block], ctx) -> int:
        """Write every block of this task; returns the number of rows written."""
        rows = 0
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if table.num_rows:
                self.write_table(table)
                rows += table.num_rows
        return rows

    def write_table(self, table: pa.Table) -> list[str]:
        """Write one block's rows; returns the shards this call assembled (completed)."""
        completed = []
        shards = table["shard"]
        for shard in pc.unique(shards).to_pylist():
            rows = table.filter(pc.equal(shards, shard))
            expected = int(rows["shard_samples"][0].as_py())
            self._write_piece(shard, rows)
            if self._listed_rows(shard) >= expected and self.assemble(shard, expected):
                completed.append(shard)
        return completed

    def _write_piece(self, shard: str, table: pa.Table) -> None:
        """The rows' image files (layout files/both), then their piece."""
        columns = {name: table[name].to_pylist() for name in table.column_names}
        count = table.num_rows
        ids, samples, images = columns["prompt_id"], columns["sample_idx"], columns["image"]
        errors = [e or None for e in columns["error"]]
        if self.files:
            for i in range(count):
                if images[i] and not errors[i]:
                    name = image_name(ids[i], samples[i], self.image_format)
                    self.storage.write_atomic(self.storage.path(IMAGES, name), images[i])
        scores = columns.get("score") or [None] * count
        edits = {name: [v if isinstance(v, str) and v else None for v in columns.get(name) or [None] * count]
                 for name in ("init_image", "mask_image")}
        strengths = columns.get("strength") or [None] * count
        piece = {
            "prompt_id": ids, "sample_idx": samples, "prompt": columns["prompt"],
            "negative_prompt": [n or None for n in columns["negative_prompt"]], "seed": columns["seed"],
            **edits, "strength": [None if s is None or np.isnan(s) else float(s) for s in strengths],
            "shard": [shard] * count, "image_bytes": [len(b or b"") if not e else 0 for b, e in zip(images, errors)],
            **{key: [self.run[key]] * count for key in RUN_COLUMNS},
            "score": [None if s is None or np.isnan(s) else float(s) for s in scores],
            "nfe": columns["nfe"], "gen_seconds": columns["gen_seconds"], "error": errors,
            "written_at": [int(time.time() * 1000)] * count,
            "image": [b if self.tars and not e else None for b, e in zip(images, errors)],
        }
        table = pa.table(piece, PIECE_SCHEMA)
        self.storage.write_table(self.storage.path(PIECES, shard, piece_name(table)), table)

    def _listed_rows(self, shard: str) -> int:
        """Rows of the shard's pieces on storage, from their names (retries may count a row twice)."""
        names = self.storage.list(self.storage.path(PIECES, shard), ".parquet")
        return sum(int(name.rsplit("-", 1)[1].split(".")[0]) for name in names)

    def assemble(self, shard: str, expected: int) -> bool:
        """Merge the shard's pieces into its tar (if any) and its record; False if the pieces are not whole.

        Two writers may both see a whole shard; both write the same record, and the one that finds the
        pieces already gone leaves it to the other.
        """
        paths = self.storage.list(self.storage.path(PIECES, shard), ".parquet")
        try:
            blobs = self.storage.read_many(paths)
        except FileNotFoundError:
            return False  # another writer assembled this shard and removed the pieces meanwhile
        table = pa.concat_tables([pq.read_table(io.BytesIO(b), schema=PIECE_SCHEMA) for b in blobs])
        table = first_per_key(table.sort_by([("prompt_id", "ascending"), ("sample_idx", "ascending"),
                                             ("error", "ascending", "at_start")]))
        if table.num_rows != expected:
            return False
        columns = {name: table[name].to_pylist() for name in table.column_names}
        names = [image_name(p, i, self.image_format) for p, i in zip(columns["prompt_id"], columns["sample_idx"])]
        ok = [size > 0 and not error for size, error in zip(columns["image_bytes"], columns["error"])]
        uris: list[str | None] = [self.storage.url(IMAGES, n) if good else None for n, good in zip(names, ok)]
        offsets: list[int | None] = [None] * table.num_rows
        if self.tars:
            tar, tar_offsets = _tar(names, columns["image"], ok, columns)
            self.storage.write_atomic(self.storage.path(WEBDATASET, f"{shard}.tar"), tar)
            if not self.files:
                tar_uri = self.storage.url(WEBDATASET, f"{shard}.tar")
                uris = [tar_uri if good else None for good in ok]
                offsets = [o if good else None for o, good in zip(tar_offsets, ok)]
        record = table.drop_columns(["image"])
        index = record.schema.get_field_index("image_bytes")
        record = record.add_column(index, "image_offset", pa.array(offsets, pa.int64()))
        record = record.add_column(index, "image_uri", pa.array(uris, pa.string())).select(METRICS_SCHEMA.names)
        self.storage.write_table(self.storage.path(SHARDS, f"{shard}.parquet"), record.cast(METRICS_SCHEMA))
        self.storage.remove(self.storage.path(PIECES, shard))
        return True


def first_per_key(table: pa.Table) -> pa.Table:
    """One row per (prompt_id, sample_idx) of a table sorted by key: the first (assembly sorts a good row, null
    ``error``, before a failed one, so a sample generated again after a failure keeps its good row)."""
    if table.num_rows < 2:
        return table
    ids, samples = table["prompt_id"].to_pylist(), table["sample_idx"].to_pylist()
    keep = [i for i in range(len(ids)) if i == 0 or (ids[i], samples[i]) != (ids[i - 1], samples[i - 1])]
    return table.take(keep)


def _tar(names: list[str], images: list[bytes | None], ok: list[bool],
         metrics: dict[str, list]) -> tuple[bytes, list[int]]:
    """A WebDataset shard: per sample ``<key>.<ext>`` (when it has an image) and ``<key>.json``.

    The key is the image name without its slug (``<sha256 of prompt_id>_<sample_idx>``): unique, free of
    dots (WebDataset splits keys at the first dot) and short enough for a plain ustar header.

    Returns the tar and, per sample, the byte offset of its image data inside it (-1 without image).
    """
    chunks, offsets, position = [], [], 0
    for i, name in enumerate(names):
        key, ext = name.rsplit("-", 1)[1].rsplit(".", 1)
        record = {k: v[i] for k, v in metrics.items() if k not in ("written_at", "image")}
        members = [(f"{key}.{ext}", images[i])] if ok[i] else []
        members.append((f"{key}.json", json.dumps(record, default=str).encode()))
        offsets.append(position + tarfile.BLOCKSIZE if ok[i] else -1)
        for member, data in members:
            padding = -len(data) % tarfile.BLOCKSIZE
            chunks += [_ustar_header(member, len(data)), data, b"\0" * padding]
            position += tarfile.BLOCKSIZE + len(data) + padding
    chunks.append(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
    return b"".join(chunks), offsets


def _ustar_header(name: str, size: int) -> bytes:
    """The 512-byte POSIX ustar header of a regular file (``tarfile.addfile`` spends ~0.5 ms per member in
    pure-Python copies and field packing, which made tars 80 % of a write task's time)."""
    header = bytearray(tarfile.BLOCKSIZE)
    header[0:100] = name.encode().ljust(100, b"\0")
    header[100:148] = b"0000644\0" + b"0000000\0" * 2 + b"%011o\0" % size + b"%011o\0" % int(time.time())
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    header[156:157] = tarfile.REGTYPE
    header[257:265] = tarfile.POSIX_MAGIC
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)
