"""Resume and the run manifest: what is done under ``--out``, who may write there, and the final tables.

A run's progress is its set of shard completion records ``_shards/<shard>.parquet`` (``pipeline.sinks``,
``pipeline.shards``). A rerun lists them, checks each one's Parquet footer in parallel (a corrupt, empty
or short record is reported by name and its shard redone) and generates only the shards without a good
record: its cost grows with the number of shards, never with the samples. ``finalize`` streams the records
of the planned shards into the Parquet dataset ``metrics.parquet/part-*.parquet`` (one row per
(prompt_id, sample_idx); readable as one table by pyarrow, pandas, Ray and DuckDB), fails loudly if two
rows share a key or an image object, drops leftovers of crashed writers, and closes the attempt in
``manifest.json``.

Why not Ray Data's ``CheckpointConfig``: its id column must exist when the files are read and stay unique
through every operator, but a prompt expands into ``num_images`` samples after the read and its id may be
derived; with a custom ``Datasink`` (needed to name images by prompt_id) it only checkpoints after the write,
and it loads every done id into memory on start (docs/ray-notes.md §5). Shard records give the same guarantee
at shard cost.
"""

from __future__ import annotations

import io
import json
import platform
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from pipeline.config import GenerateConfig, JobOptions
from pipeline.curation import slot_outcomes
from pipeline.redact import redact, redact_text
from pipeline.result import RunResult
from pipeline.shards import Shard
from pipeline.sinks.base import out_path
from pipeline.sinks.datasink import METRICS_SCHEMA, SHARDS, SampleSink
from pipeline.storage import OutFileError, Storage

MANIFEST, METRICS = "manifest.json", "metrics.parquet"
METRICS_ROWS_PER_FILE = 100_000  # rows per metrics.parquet/part-*.parquet file
READ_CHUNK = 256  # records fetched at once (concurrently) by a rerun and by finalize
ANSI = re.compile(r"\x1b\[[0-9;]*m")
PACKAGES = ("maskray", "torch", "diffusers", "transformers", "ray", "pyarrow", "open_clip_torch", "optimum-quanto",
            "pydantic", "fsspec", "s3fs", "pillow", "numpy")


class RunConfigMismatch(ValueError):
    """``--out`` already holds a run made with other settings."""


def read_manifest(storage: Storage) -> dict | None:
    """The run's ``manifest.json`` under ``storage`` (None when there is none).

    Raises:
        OutFileError: it is not a JSON object (hand-edited, truncated or foreign).
    """
    path = storage.path(MANIFEST)
    if not storage.exists(path):
        return None
    try:
        manifest = json.loads(storage.read(path))
        problem = None if isinstance(manifest, dict) else f"a JSON {type(manifest).__name__}, not an object"
    except (ValueError, OSError) as error:
        problem = f"not readable JSON ({type(error).__name__}: {str(error)[:200]})"
    if problem:
        raise OutFileError(f"{storage.url(MANIFEST)} is {problem}; restore it, or choose a new --out (without it a "
                           f"rerun could not check the run's settings)")
    return manifest


def check_out(storage: Storage, config: GenerateConfig) -> dict | None:
    """The manifest of the run already under ``--out`` (None if empty), if it has this config's hash.

    Raises:
        RunConfigMismatch: the hashes differ; the message lists each differing factor with both values.
    """
    manifest = read_manifest(storage)
    if manifest is None or manifest.get("config_hash") == config.config_hash():
        return manifest
    old, new = _flatten(manifest.get("hashed_factors", {})), _flatten(config.hashed_factors())
    changes = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key)]
    raise RunConfigMismatch(
        f"--out {storage.uri} already holds a run with config hash {manifest.get('config_hash')}, this run's is "
        f"{config.config_hash()} ({'; '.join(changes) or 'different factors'}); rerun with the original settings "
        f"to resume it, or choose a new --out"
    )


def shard_size(manifest: dict | None, job: JobOptions, samples: int, default: Callable[[int], int]) -> int:
    """The run's shard size: the one ``manifest.json`` recorded, else ``--shard-size``, else ``default(samples)``.

    Raises:
        RunConfigMismatch: ``--shard-size`` differs from the size the run under ``--out`` was cut with.
    """
    recorded = (manifest or {}).get("shard_size")
    if recorded and job.shard_size and job.shard_size != recorded:
        raise RunConfigMismatch(f"--out {job.out} was cut into shards of {recorded} samples, this run asks for "
                                f"--shard-size {job.shard_size}; rerun with --shard-size {recorded} (or without it) "
                                f"to resume, or choose a new --out")
    return int(recorded or job.shard_size or default(samples))


@dataclass
class RecordScan:
    """What a rerun found under ``_shards/``: good records by shard name, the bad ones with the reason, and of
    those the records that are whole but hold failed samples (their good rows are kept: ``pipeline.partial``)."""

    done: dict[str, int] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    stale: int = 0


def scan_records(storage: Storage, plan: list[Shard], keep_failed: bool = False) -> RecordScan:
    """List the completion records and check every planned shard's record (footer and row count) in parallel.

    A record that is empty, unreadable or holds another row count than its shard is *bad*: its shard is
    generated again (the new record replaces it). So is a record holding failed samples (a transient CUDA
    OOM or lost connection gets its retry), unless ``keep_failed``; only its failed samples are generated
    again (``failed``). The failures are counted from the footer's null count of ``error``, so this costs no
    extra read. Records of shards not in the plan (the input changed) are counted as stale and ignored.
    """
    expected = {shard.name: shard.samples for shard in plan}
    listed = storage.sizes(storage.path(SHARDS), ".parquet")
    found, scan = {}, RecordScan()
    for path, size in listed.items():
        name = Path(path).stem
        if name not in expected:
            scan.stale += 1
        elif size == 0:
            scan.bad[name] = "empty file"
        else:
            found[name] = path
    names = sorted(found)
    for start in range(0, len(names), READ_CHUNK):
        chunk = names[start:start + READ_CHUNK]
        for name, blob in zip(chunk, storage.read_many([found[n] for n in chunk])):
            try:
                metadata = pq.read_metadata(io.BytesIO(blob))
            except (pa.ArrowInvalid, OSError) as error:
                scan.bad[name] = f"unreadable ({type(error).__name__}: {error})"
                continue
            problem = record_problem(metadata)
            failed = 0 if keep_failed or problem else _failed_rows(blob)
            if problem:
                scan.bad[name] = problem
            elif metadata.num_rows != expected[name]:
                scan.bad[name] = f"{metadata.num_rows} rows, the shard has {expected[name]}"
            elif failed:
                check_record_paths(storage, storage.url(SHARDS, f"{name}.parquet"), blob)  # its images are read back
                scan.bad[name] = f"holding {failed} failed sample(s) (--keep-failed keeps them)"
                scan.failed.add(name)
            else:
                scan.done[name] = metadata.num_rows
    return scan


# Columns a completion record must hold (records of older runs lack ``candidate`` and ``kept``, read as null), and
# of those the ones that are never null.
RECORD_COLUMNS = ("prompt_id", "sample_idx", "image_uri", "image_offset", "image_bytes", "error")
NEVER_NULL = ("prompt_id", "sample_idx", "image_bytes")


def record_problem(metadata: pq.FileMetaData) -> str | None:
    """What makes a completion record unusable, from its footer alone (None: nothing): a missing column, or nulls
    where a record never has them (footer statistics; a writer without them is not checked here)."""
    names = metadata.schema.names
    missing = [name for name in RECORD_COLUMNS if name not in names]
    if missing:
        return f"missing column(s) {missing} (not a maskray completion record)"
    for name in NEVER_NULL:
        column = names.index(name)
        for group in range(metadata.num_row_groups):
            stats = metadata.row_group(group).column(column).statistics
            if stats is not None and stats.has_null_count and stats.null_count:
                return f"holding null {name} values (not a maskray completion record)"
    return None


def check_record_paths(storage: Storage, record: str, blob: bytes) -> None:
    """Refuse a record whose ``image_uri`` leaves ``--out``: a rerun reads its images back into the output.

    Raises:
        OutFileError: naming the record and the path, with the fix.
    """
    uris = pq.read_table(io.BytesIO(blob), columns=["image_uri"])["image_uri"].drop_null()
    for uri in pc.unique(uris).to_pylist():
        try:
            out_path(storage, uri)
        except ValueError as error:
            raise OutFileError(f"completion record {record}: its {error}; a rerun would read that file into the output: delete the record (its "
                               f"shard is generated again)") from None


def start_attempt(storage: Storage, config: GenerateConfig, manifest: dict | None, inputs: list[str],
                  done_before: int, shard_size: int) -> dict:
    """Write ``manifest.json`` with a new running attempt; returns the manifest.

    The config is recorded redacted (``pipeline.redact``); earlier attempts that never closed (their process was
    killed) are marked ``abandoned``.
    """
    manifest = manifest or {"config_hash": config.config_hash(), "hashed_factors": config.hashed_factors(),
                            "attempts": []}
    manifest.update(status="running", config=redact(config.model_dump(mode="json")), inputs=inputs,
                    shard_size=shard_size,
                    packages=_versions(), git_revision=_git_revision(), python=platform.python_version())
    for earlier in manifest["attempts"]:
        if "ended_at" not in earlier:  # killed outright (SIGKILL, node loss): it could not close itself
            earlier.setdefault("status", "abandoned")
    manifest["attempts"].append({"attempt": len(manifest["attempts"]), "started_at": _now(),
                                 "done_before": done_before})
    _write_manifest(storage, manifest)
    return manifest


def fail_attempt(storage: Storage, manifest: dict, error: BaseException, secrets: list[str]) -> None:
    """Close the running attempt as failed, with the error's type and message (``secrets`` scrubbed out).

    A Ray task error is recorded as its root cause (the user code's exception), its terminal colours removed.
    """
    cause = _root_cause(error)
    message = redact_text(ANSI.sub("", str(cause)), secrets)[:2000]
    described = {"type": type(cause).__name__, "message": message}
    if cause is not error:  # Ray keeps the user code's own exception only in the text of its traceback
        described["raised_as"] = type(error).__name__
        described["detail"] = redact_text(ANSI.sub("", str(error)), secrets)[-2000:]
    manifest["attempts"][-1].update(ended_at=_now(), status="failed", error=described)
    manifest["status"] = "failed"
    _write_manifest(storage, manifest)


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception: Ray's ``cause``, else ``__cause__``, followed to the end."""
    seen = {id(error)}
    while True:
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException) or id(inner) in seen:
            return error
        seen.add(id(inner))
        error = inner


class OutputCollision(RuntimeError):
    """Two metrics rows share a (prompt_id, sample_idx) key or an image object: one output overwrote another."""


def finalize(sink: SampleSink, manifest: dict, plan: list[Shard], seconds: float) -> RunResult:
    """Stream the planned shards' records into ``metrics.parquet/``, drop leftovers, close the attempt.

    Records are fetched ``READ_CHUNK`` at a time (concurrently) and written out every
    ``METRICS_ROWS_PER_FILE`` rows, so memory holds one part, plus 16 bytes per row for the collision check.

    Args:
        sink: the run's sink: its ``--out`` root, and its layout, which drops what writers left (``clean_up``).
        manifest: the run's manifest, its running attempt last.
        plan: every shard of the run.
        seconds: this attempt's generation time.

    Returns:
        The run's result; its ``counts()`` are also stored in the manifest.

    Raises:
        OutputCollision: two rows share a key or an image object (names both rows).
    """
    storage = sink.storage
    attempt = manifest["attempts"][-1]
    planned = {shard.name for shard in plan}
    records = storage.sizes(storage.path(SHARDS), ".parquet")
    paths = sorted(p for p in records if Path(p).stem in planned)
    folder = storage.path(METRICS)
    totals = {"rows": 0, "errors": 0, "generated": 0, "scored": 0, "score_sum": 0.0, "kept": 0, "kept_scored": 0,
              "kept_score_sum": 0.0}
    dropped = {"below_min_score": 0, "no_good_candidate": 0}
    key = ["prompt_id", "sample_idx", "candidate"]
    key_hashes, uri_hashes, pending, parts = [], [], [], []

    def flush() -> None:
        name = f"part-{len(parts):05d}.parquet"
        storage.write_table(f"{folder}/{name}", pa.concat_tables(pending))
        parts.append(name)
        pending.clear()

    for start in range(0, len(paths), READ_CHUNK):
        chunk = paths[start:start + READ_CHUNK]
        for blob in storage.read_many(chunk):
            table = pq.read_table(io.BytesIO(blob), schema=METRICS_SCHEMA)
            _count(table, totals, attempt["attempt"])
            if sink.curation.active:
                outcomes = slot_outcomes(table)
                for reason in dropped:
                    dropped[reason] += outcomes[reason]
            key_hashes.append(_hash(table, key))
            uris = table.filter(pc.is_valid(table["image_uri"]))
            uri_hashes.append(_hash(uris, ["image_uri", "image_offset"]))
            pending.append(table)
            if sum(t.num_rows for t in pending) >= METRICS_ROWS_PER_FILE:
                flush()
    if pending or not parts:  # the rest, or one empty part so that the dataset has its schema
        pending.append(METRICS_SCHEMA.empty_table())
        flush()
    for stale in storage.list(folder, ".parquet"):
        if Path(stale).name not in parts:
            storage.remove(stale)
    _check_unique(storage, key_hashes, key, "key")
    _check_unique(storage, uri_hashes, ["image_uri", "image_offset"], "image object")
    sink.clean_up({Path(p).stem for p in records})
    result = RunResult(
        rows=totals["rows"], expected=int(sum(s.samples for s in plan)), errors=totals["errors"],
        generated=totals["generated"], shards=len(plan), shards_done=len(paths),
        stale_records=len(records) - len(paths), seconds=round(seconds, 3),
        images_per_second=round(totals["generated"] / seconds, 3) if seconds > 0 else None,
        mean_score=totals["score_sum"] / totals["scored"] if totals["scored"] else None,
        metrics_uri=storage.url(METRICS), manifest_uri=storage.url(MANIFEST), kept=totals["kept"],
        mean_kept_score=totals["kept_score_sum"] / totals["kept_scored"] if totals["kept_scored"] else None,
        dropped=dropped if sink.curation.active else {},
    )
    status = "complete" if result.complete else "incomplete"
    attempt.update(ended_at=_now(), status=status, **result.counts())
    manifest.update(status=status, counts=result.counts())
    sink.finish(manifest)
    _write_manifest(storage, manifest)
    return result


def read_metrics(storage: Storage, columns: list[str] | None = None) -> pa.Table:
    """The final metrics of the run under ``storage`` as one table (all ``metrics.parquet/`` parts)."""
    return pds.dataset(storage.path(METRICS), filesystem=storage.arrow_fs, format="parquet",
                       schema=METRICS_SCHEMA).to_table(columns=columns)


def _count(table: pa.Table, totals: dict, attempt: int) -> None:
    totals["rows"] += table.num_rows
    totals["errors"] += table.num_rows - table["error"].null_count
    totals["generated"] += int(pc.sum(pc.equal(table["attempt"], attempt)).as_py() or 0)
    scores = table["score"].drop_null()
    totals["scored"] += len(scores)
    totals["score_sum"] += float(pc.sum(scores).as_py() or 0.0)
    kept = pc.fill_null(table["kept"], False) if table["kept"].null_count < table.num_rows \
        else pc.is_null(table["error"])  # a record of an older run, without ``kept``: its good rows
    totals["kept"] += int(pc.sum(kept).as_py() or 0)
    kept_scores = table["score"].filter(kept).drop_null()
    totals["kept_scored"] += len(kept_scores)
    totals["kept_score_sum"] += float(pc.sum(kept_scores).as_py() or 0.0)


def _failed_rows(record: bytes) -> int:
    """Rows of a completion record with an error: rows minus the ``error`` column's null count (footer stats)."""
    metadata = pq.read_metadata(io.BytesIO(record))
    column = metadata.schema.names.index("error")
    failed = 0
    for group in range(metadata.num_row_groups):
        stats = metadata.row_group(group).column(column).statistics
        if stats is None or not stats.has_null_count:  # a writer without statistics: read the column
            table = pq.read_table(io.BytesIO(record), columns=["error"])
            return table.num_rows - table["error"].null_count
        failed += metadata.row_group(group).num_rows - stats.null_count
    return failed


def _hash(table: pa.Table, columns: list[str]) -> np.ndarray:
    """64-bit hashes of the rows' ``columns`` (pandas' vectorised SipHash)."""
    return pd.util.hash_pandas_object(table.select(columns).to_pandas(), index=False).to_numpy()


def _check_unique(storage: Storage, hashes: list[np.ndarray], columns: list[str], what: str) -> None:
    """Raise ``OutputCollision`` if two rows share ``columns``: hashes first, then the exact values."""
    values, counts = np.unique(np.concatenate(hashes) if hashes else np.empty(0, np.uint64), return_counts=True)
    if not (counts > 1).any():
        return
    table = read_metrics(storage, ["prompt_id", "sample_idx", *[c for c in columns if c not in
                                                                  ("prompt_id", "sample_idx")]])
    table = table.filter(pc.is_in(pa.array(_hash(table, columns)), pa.array(values[counts > 1])))
    groups = table.group_by(columns).aggregate([("prompt_id", "list"), ("sample_idx", "list")])
    clashes = [row for row in groups.to_pylist() if len(row["prompt_id_list"]) > 1]
    if clashes:
        row = clashes[0]
        rows = sorted(zip(row["prompt_id_list"], row["sample_idx_list"]))  # arrow's group_by list order varies
        where = ", ".join(f"{c}={row[c]!r}" for c in columns)
        raise OutputCollision(f"{len(clashes)} {what}(s) shared by several metrics rows under {storage.uri}, e.g. "
                              f"{where} for (prompt_id, sample_idx) {rows}: one output overwrote another; this is "
                              f"a bug in the shard plan or the image names, report it with manifest.json")


def _write_manifest(storage: Storage, manifest: dict) -> None:
    storage.write_atomic(storage.path(MANIFEST), json.dumps(manifest, indent=2, default=str).encode())


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git_revision() -> str | None:
    """The commit of the checkout this code runs from (None when installed from a wheel)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
