"""``SampleSink``: the Ray Data ``Datasink`` that writes images, completion records and WebDataset shards.

Layout under ``--out`` (local folder or object-store prefix)::

    images/<slug>-<hash8>_<sample_idx>.<ext>   one file per sample, named by (prompt_id, sample_idx)
    _parts/<block hash>.parquet                metrics rows of one written block: the completion record
    webdataset/<block hash>.tar                optional, the same block as a WebDataset shard
    metrics.parquet, manifest.json             written by ``pipeline.manifest.finalize`` at the end

Names derive from content keys, never from Ray's write UUID or task index (docs/ray-notes.md §4), so a retried task
or a rerun overwrites instead of duplicating. A block's images (and tar) are written before its part file,
and the part is written atomically, so a part on storage means its images are complete: resume trusts parts
only. ``prompt_id`` is user data: ``image_name`` slugs it and appends a hash, so ``../x`` or ``a/b`` can
never leave ``images/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from pipeline.storage import Storage

IMAGES, PARTS, WEBDATASET = "images", "_parts", "webdataset"
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
SLUG_CHARS = 48

# The metrics table, one row per (prompt_id, sample_idx); null score when no scorer ran, null error when OK.
METRICS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("sample_idx", pa.int64()), ("prompt", pa.string()),
    ("negative_prompt", pa.string()), ("seed", pa.int64()), ("image_uri", pa.string()),
    ("image_bytes", pa.int64()), ("model", pa.string()), ("quantization", pa.string()), ("sampler", pa.string()),
    ("sampler_hash", pa.string()), ("config_hash", pa.string()), ("scorer", pa.string()), ("score", pa.float64()),
    ("nfe", pa.int64()), ("gen_seconds", pa.float64()), ("error", pa.string()), ("attempt", pa.int64()),
    ("written_at", pa.timestamp("ms", tz="UTC")),
])


def image_name(prompt_id: str, sample_idx: int, image_format: str) -> str:
    """A file name that stays inside ``images/`` whatever ``prompt_id`` holds.

    ``[A-Za-z0-9._-]`` runs of the id (at most 48 characters, no leading dots) give a readable slug; the
    first 8 hex digits of SHA-256(prompt_id) keep distinct ids distinct (``a/b`` vs ``a-b``).
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", prompt_id)[:SLUG_CHARS].strip(".-") or "prompt"
    digest = hashlib.sha256(prompt_id.encode()).hexdigest()[:8]
    return f"{slug}-{digest}_{int(sample_idx)}.{EXTENSIONS[image_format]}"


def block_id(prompt_ids: Iterable[str], sample_idx: Iterable[int]) -> str:
    """20 hex digits of SHA-256 over a block's sorted sample keys: the same rows give the same name."""
    keys = sorted(f"{p}\x00{int(i)}" for p, i in zip(prompt_ids, sample_idx))
    return hashlib.sha256("\x01".join(keys).encode()).hexdigest()[:20]


class SampleSink(Datasink[int]):
    """Writes each block's images, then its WebDataset shard (optional), then its completion record.

    Args:
        storage: the ``--out`` root.
        run: constant metrics columns of this run (``model``, ``quantization``, ``sampler``,
            ``sampler_hash``, ``config_hash``, ``scorer``, ``attempt``).
        image_format: ``png``, ``webp`` or ``jpeg`` (the file extension).
        webdataset: also write ``webdataset/<block>.tar``.
    """

    def __init__(self, storage: Storage, run: dict, image_format: str, webdataset: bool = False):
        self.storage, self.run, self.image_format, self.webdataset = storage, dict(run), image_format, webdataset

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

    def write_table(self, table: pa.Table) -> str:
        """Write one block; returns its id (the part and tar name)."""
        columns = {name: table[name].to_pylist() for name in table.column_names}
        count = table.num_rows
        ids, samples = columns["prompt_id"], columns["sample_idx"]
        uris, sizes, names = [], [], []
        for i in range(count):
            data = columns["image"][i] or b""
            name = image_name(ids[i], samples[i], self.image_format)
            names.append(name)
            if columns["error"][i] or not data:
                uris.append(None)
                sizes.append(0)
                continue
            self.storage.write_atomic(self.storage.path(IMAGES, name), data)
            uris.append(self.storage.url(IMAGES, name))
            sizes.append(len(data))
        part = block_id(ids, samples)
        scores = columns.get("score") or [None] * count
        metrics = {
            "prompt_id": ids, "sample_idx": samples, "prompt": columns["prompt"],
            "negative_prompt": [n or None for n in columns["negative_prompt"]], "seed": columns["seed"],
            "image_uri": uris, "image_bytes": sizes,
            **{key: [self.run[key]] * count for key in ("model", "quantization", "sampler", "sampler_hash",
                                                         "config_hash", "scorer")},
            "score": [None if s is None or np.isnan(s) else float(s) for s in scores],
            "nfe": columns["nfe"], "gen_seconds": columns["gen_seconds"],
            "error": [e or None for e in columns["error"]], "attempt": [self.run["attempt"]] * count,
            "written_at": [int(time.time() * 1000)] * count,
        }
        if self.webdataset:
            self.storage.write_atomic(self.storage.path(WEBDATASET, f"{part}.tar"),
                                      _tar(names, columns["image"], metrics))
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pydict(metrics, schema=METRICS_SCHEMA), buffer)
        self.storage.write_atomic(self.storage.path(PARTS, f"{part}.parquet"), buffer.getvalue())
        return part


def _tar(names: list[str], images: list[bytes], metrics: dict[str, list]) -> bytes:
    """A WebDataset shard: per sample ``<key>.<ext>`` (image, when there is one) and ``<key>.json``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i, name in enumerate(names):
            key, ext = name.rsplit(".", 1)
            key = key.replace(".", "_")  # WebDataset splits the key at the first dot
            record = {k: v[i] for k, v in metrics.items() if k != "written_at"}
            members = [(f"{key}.json", json.dumps(record, default=str).encode())]
            if images[i] and not metrics["error"][i]:
                members.insert(0, (f"{key}.{ext}", images[i]))
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
