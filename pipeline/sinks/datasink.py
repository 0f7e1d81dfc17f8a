"""``SampleSink``: the Ray Data ``Datasink`` that writes shard completion records, and images through the layout.

Ray Data hands a write task whatever rows arrive (a block may hold the end of one shard and the start of
the next), so every write task hands its rows' images to the layout (``pipeline.sinks.base``), then writes one
*piece* per shard it touched, then lists that shard's pieces. The task whose piece brings the listed count to the
shard's size assembles the shard: it reads the pieces, lets the layout write its shard-level output (a tar), then
writes the record (atomically), then drops the pieces. Whichever piece lands last, its writer lists after every
other piece is on storage, so some writer always sees the whole shard (a retried task only adds duplicate rows,
which assembly drops). A record on storage therefore means the shard's images are complete: resume trusts
records, and a rerun completes the shards a crash left in pieces around the rows they hold (``pipeline.partial``).
When a sample is written twice, once failed and once good (a failure generated again), assembly keeps the good row.

Names derive from content keys, never from Ray's write UUID or task index (docs/ray-notes.md §4), so a
retried task or a rerun overwrites instead of duplicating. ``prompt_id`` is user data: ``image_name`` slugs it for
reading and appends its full SHA-256, so ``../x`` or ``a/b`` can never leave ``images/`` and two ids never share a
name.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from pipeline.curation import Curation
from pipeline.sinks.base import ShardImages, image_name
from pipeline.sinks.registry import build_sink
from pipeline.storage import OutFileError, Storage

SHARDS, PIECES = "_shards", "_pieces"

# The metrics table, one row per (prompt_id, sample_idx, candidate); null score when no scorer ran, null error when
# OK. ``candidate`` is 0 unless ``--best-of``; ``kept`` says whether the row's image belongs to the run's output
# (``pipeline.curation``: without curation, every good row); both are null in records of older runs.
# ``image_uri`` and ``image_offset`` locate the image as the layout says (``pipeline.sinks.files``: the image
# file; ``webdataset``: the shard's tar, the image at ``image_offset`` for ``image_bytes``). ``init_image``, ``mask_image`` and ``strength``
# are the edit inputs of the row (resolved URIs; null for a plain generation and in records of older runs,
# which read back with these columns null).
METRICS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("sample_idx", pa.int64()), ("candidate", pa.int64()), ("prompt", pa.string()),
    ("negative_prompt", pa.string()), ("seed", pa.int64()), ("init_image", pa.string()), ("mask_image", pa.string()),
    ("strength", pa.float64()), ("shard", pa.string()), ("image_uri", pa.string()),
    ("image_offset", pa.int64()), ("image_bytes", pa.int64()), ("model", pa.string()),
    ("quantization", pa.string()), ("sampler", pa.string()), ("sampler_hash", pa.string()),
    ("config_hash", pa.string()), ("scorer", pa.string()), ("score", pa.float64()), ("kept", pa.bool_()),
    ("nfe", pa.int64()),
    ("gen_seconds", pa.float64()), ("error", pa.string()), ("attempt", pa.int64()),
    ("written_at", pa.timestamp("ms", tz="UTC")),
])
# A piece: the metrics columns known before assembly, plus the encoded image when the layout needs it.
PIECE_SCHEMA = pa.schema([f for f in METRICS_SCHEMA if f.name not in ("image_uri", "image_offset", "kept")]
                         + [pa.field("image", pa.binary())])
RUN_COLUMNS = ("model", "quantization", "sampler", "sampler_hash", "config_hash", "scorer", "attempt")


def rows_id(prompt_ids: Iterable[str], sample_idx: Iterable[int], candidates: Iterable[int | None] = ()) -> str:
    """20 hex digits of SHA-256 over sorted sample keys: the same rows give the same piece name (a candidate other
    than 0 is part of its key)."""
    sample_idx = list(sample_idx)
    candidates = list(candidates) or [0] * len(sample_idx)
    keys = sorted(f"{p}\x00{int(i)}" + (f"\x00{int(c)}" if c else "")
                  for p, i, c in zip(prompt_ids, sample_idx, candidates))
    return hashlib.sha256("\x01".join(keys).encode()).hexdigest()[:20]


def piece_name(piece: pa.Table) -> str:
    """``<rows_id>-<rows>.parquet``: the same rows give the same name, and a listing counts rows without reads."""
    key = rows_id(piece["prompt_id"].to_pylist(), piece["sample_idx"].to_pylist(), piece["candidate"].to_pylist())
    return f"{key}-{piece.num_rows}.parquet"


class SampleSink(Datasink[int]):
    """Writes each block's images (through the layout) and pieces, and assembles every shard it completes.

    Args:
        storage: the ``--out`` root.
        run: constant metrics columns of this run (``RUN_COLUMNS``).
        image_format: ``png``, ``webp`` or ``jpeg`` (the file extension).
        layout: the ``--layout`` name: ``files``, ``webdataset``, ``both`` or another registered layout
            (``pipeline.sinks.registry``).
        rows_per_write: rows Ray Data gathers for one write task (the shard size: about one piece per shard
            and per task, instead of one per generator batch).
        curation: which candidates the run keeps (``pipeline.curation``); when it selects, pieces carry every
            candidate's image and assembly hands the layout only the kept ones (all with ``keep_all_images``).

    Rows must carry ``shard`` (the shard's name) and ``shard_samples`` (its size) besides the generator's
    and scorer's columns.
    """

    def __init__(self, storage: Storage, run: dict, image_format: str, layout: str = "files",
                 rows_per_write: int | None = None, curation: Curation | None = None):
        self.storage, self.run, self.image_format = storage, dict(run), image_format
        self.images = build_sink(layout, storage, image_format)
        self.rows_per_write = rows_per_write
        self.curation = curation or Curation()

    @property
    def carries_images(self) -> bool:
        """Pieces hold the encoded images until assembly (the layout builds from them, or candidates are chosen)."""
        return self.images.needs_image_bytes or self.curation.active

    @property
    def min_rows_per_write(self) -> int | None:
        return self.rows_per_write

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
        """The rows' images (the layout's ``write_samples``, unless candidates are chosen at assembly), then their
        piece."""
        columns = {name: table[name].to_pylist() for name in table.column_names}
        count = table.num_rows
        ids, samples, images = columns["prompt_id"], columns["sample_idx"], columns["image"]
        candidates = columns.get("candidate") or [0] * count
        errors = [e or None for e in columns["error"]]
        if not self.curation.active:
            names = [image_name(p, i, self.image_format) for p, i in zip(ids, samples)]
            self.images.write_samples(ShardImages(names, images, [bool(b) and not e for b, e in zip(images, errors)],
                                                  columns))
        scores = columns.get("score") or [None] * count
        edits = {name: [v if isinstance(v, str) and v else None for v in columns.get(name) or [None] * count]
                 for name in ("init_image", "mask_image")}
        strengths = columns.get("strength") or [None] * count
        keep_images = self.carries_images
        piece = {
            "prompt_id": ids, "sample_idx": samples, "candidate": candidates, "prompt": columns["prompt"],
            "negative_prompt": [n or None for n in columns["negative_prompt"]], "seed": columns["seed"],
            **edits, "strength": [None if s is None or np.isnan(s) else float(s) for s in strengths],
            "shard": [shard] * count, "image_bytes": [len(b or b"") if not e else 0 for b, e in zip(images, errors)],
            **{key: [self.run[key]] * count for key in RUN_COLUMNS},
            "score": [None if s is None or np.isnan(s) else float(s) for s in scores],
            "nfe": columns["nfe"], "gen_seconds": columns["gen_seconds"], "error": errors,
            "written_at": [int(time.time() * 1000)] * count,
            "image": [b if keep_images and not e else None for b, e in zip(images, errors)],
        }
        table = pa.table(piece, PIECE_SCHEMA)
        self.storage.write_table(self.storage.path(PIECES, shard, piece_name(table)), table)

    def _listed_rows(self, shard: str) -> int:
        """Rows of the shard's pieces on storage, from their names (retries may count a row twice)."""
        names = self.storage.list(self.storage.path(PIECES, shard), ".parquet")
        return sum(int(name.rsplit("-", 1)[1].split(".")[0]) for name in names)

    def assemble(self, shard: str, expected: int) -> bool:
        """Merge the shard's pieces into the layout's shard output (if any) and its record; False if the pieces
        are not whole.

        Two writers may both see a whole shard; both write the same record, and the one that finds the
        pieces already gone leaves it to the other.
        """
        paths = self.storage.list(self.storage.path(PIECES, shard), ".parquet")
        try:
            blobs = self.storage.read_many(paths)
        except FileNotFoundError:
            return False  # another writer assembled this shard and removed the pieces meanwhile
        table = pa.concat_tables([read_piece(self.storage, path, blob) for path, blob in zip(paths, blobs)])
        table = table.set_column(table.schema.get_field_index("candidate"), "candidate",
                                 pc.fill_null(table["candidate"], 0))
        table = first_per_key(table.sort_by([("prompt_id", "ascending"), ("sample_idx", "ascending"),
                                             ("candidate", "ascending"), ("error", "ascending", "at_start")]))
        if table.num_rows != expected:
            return False
        columns = {name: table[name].to_pylist() for name in table.column_names}
        names = [image_name(p, i, self.image_format, c)
                 for p, i, c in zip(columns["prompt_id"], columns["sample_idx"], columns["candidate"])]
        ok = [size > 0 and not error for size, error in zip(columns["image_bytes"], columns["error"])]
        images = columns.pop("image")
        kept = columns["kept"] = self.curation.kept(columns)
        if self.curation.active:  # only the chosen candidates' images (whose bytes this assembly holds) are written
            wanted = self.curation.keep_all_images
            ok = [good and (keep or wanted) and image is not None for good, keep, image in zip(ok, kept, images)]
            self.images.write_samples(ShardImages(names, images, ok, columns))
        located = self.images.assemble(shard, ShardImages(names, images, ok, columns))
        record = table.drop_columns(["image"])
        index = record.schema.get_field_index("image_bytes")
        record = record.add_column(index, "image_offset", pa.array(located.offsets, pa.int64()))
        record = record.add_column(index, "image_uri", pa.array(located.uris, pa.string()))
        record = record.append_column("kept", pa.array(kept, pa.bool_()))
        record = record.select(METRICS_SCHEMA.names)
        self.storage.write_table(self.storage.path(SHARDS, f"{shard}.parquet"), record.cast(METRICS_SCHEMA))
        self.storage.remove(self.storage.path(PIECES, shard))
        return True

    def clean_up(self, recorded: set[str]) -> None:
        """At ``finalize``: drop the layout's output of shards without a record, then every piece (rows of shards a
        crash left incomplete, or of retried writes)."""
        self.images.clean_up(recorded)
        self.storage.remove(self.storage.path(PIECES))

    def finish(self, manifest: dict) -> None:
        """At ``finalize``, once the counts are in ``manifest``: the layout's run-level files."""
        self.images.finish(manifest)


# Piece columns a piece never has null (a piece missing one reads it as null).
PIECE_NEVER_NULL = ("prompt_id", "sample_idx", "image_bytes")


def read_piece(storage: Storage, path: str, blob: bytes, columns: list[str] | None = None) -> pa.Table:
    """The rows of the piece ``path`` (its bytes ``blob``), in ``PIECE_SCHEMA``.

    Raises:
        OutFileError: the file is not a piece (not Parquet, or nulls where a piece has none), naming it and the fix.
    """
    try:
        table = pq.read_table(io.BytesIO(blob), schema=PIECE_SCHEMA, columns=columns)
        problem = next((f"null {name} values" for name in PIECE_NEVER_NULL
                        if name in table.column_names and table[name].null_count), None)
    except (pa.ArrowException, OSError) as error:
        problem = "not a Parquet file" if "Parquet" in str(error) else f"unreadable ({type(error).__name__})"
    if problem:
        where = path if storage.local else storage.fs.unstrip_protocol(path)
        raise OutFileError(f"piece {where} under --out holds {problem}, so it is not a piece a maskray run wrote; "
                           f"delete it (its samples are generated again)")
    return table


def first_per_key(table: pa.Table) -> pa.Table:
    """One row per (prompt_id, sample_idx, candidate) of a table sorted by key: the first (assembly sorts a good
    row, null ``error``, before a failed one, so a sample generated again after a failure keeps its good row)."""
    if table.num_rows < 2:
        return table
    keys = list(zip(table["prompt_id"].to_pylist(), table["sample_idx"].to_pylist(),
                    table["candidate"].to_pylist()))
    keep = [i for i in range(len(keys)) if i == 0 or keys[i] != keys[i - 1]]
    return table.take(keep)
