"""Resume and the run manifest: what is done under ``--out``, who may write there, and the final tables.

A run's progress is the set of completion records ``_parts/*.parquet`` (``pipeline.sink``). A rerun reads
their (prompt_id, sample_idx) keys and generates only the rest; ``finalize`` merges the records into
``metrics.parquet`` (one row per key, the exactly-once view), drops WebDataset shards whose record never
landed, and closes the attempt in ``manifest.json``.

Why not Ray Data's ``CheckpointConfig``: its id column must exist when the files are read and stay unique
through every operator, but a prompt expands into ``num_images`` samples after the read and its id may be
derived; with a custom ``Datasink`` (needed to name images by prompt_id) it only checkpoints after the write
(docs/ray-notes.md §5). The completion records give the same guarantee with content-keyed names.
"""

from __future__ import annotations

import io
import json
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import GenerateConfig
from pipeline.sink import METRICS_SCHEMA, PARTS, WEBDATASET
from pipeline.storage import Storage

MANIFEST, METRICS = "manifest.json", "metrics.parquet"
PACKAGES = ("maskray", "torch", "diffusers", "transformers", "ray", "pyarrow", "open_clip_torch", "optimum-quanto",
            "pydantic", "fsspec", "s3fs", "pillow", "numpy")


class RunConfigMismatch(ValueError):
    """``--out`` already holds a run made with other settings."""


def read_manifest(storage: Storage) -> dict | None:
    path = storage.path(MANIFEST)
    return json.loads(storage.read(path)) if storage.exists(path) else None


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


def completed(storage: Storage) -> pa.Table:
    """``prompt_id``, ``sample_idx`` of every sample with a completion record (duplicates possible)."""
    files = storage.list(storage.path(PARTS), ".parquet")
    tables = [pq.read_table(io.BytesIO(storage.read(f)), columns=["prompt_id", "sample_idx"]) for f in files]
    return pa.concat_tables(tables) if tables else METRICS_SCHEMA.empty_table().select(["prompt_id", "sample_idx"])


def start_attempt(storage: Storage, config: GenerateConfig, manifest: dict | None, inputs: list[str],
                  done_before: int) -> dict:
    """Write ``manifest.json`` with a new running attempt; returns the manifest."""
    manifest = manifest or {"config_hash": config.config_hash(), "hashed_factors": config.hashed_factors(),
                            "attempts": []}
    manifest.update(status="running", config=config.model_dump(mode="json"), inputs=inputs,
                    packages=_versions(), git_revision=_git_revision(), python=platform.python_version())
    manifest["attempts"].append({"attempt": len(manifest["attempts"]), "started_at": _now(),
                                 "done_before": done_before})
    _write_manifest(storage, manifest)
    return manifest


def finalize(storage: Storage, manifest: dict, expected: int, seconds: float) -> dict:
    """Merge the completion records into ``metrics.parquet``, drop orphan shards, close the attempt.

    Returns:
        The summary also stored in the manifest: ``rows`` (unique samples), ``expected``, ``errors``,
        ``generated`` (this attempt), ``duplicates_dropped``, ``images_per_second`` (this attempt),
        ``mean_score``.
    """
    attempt = manifest["attempts"][-1]
    part_files = storage.list(storage.path(PARTS), ".parquet")
    tables = [pq.read_table(io.BytesIO(storage.read(f)), schema=METRICS_SCHEMA) for f in part_files]
    metrics = pa.concat_tables(tables) if tables else METRICS_SCHEMA.empty_table()
    metrics = metrics.sort_by([("prompt_id", "ascending"), ("sample_idx", "ascending"), ("attempt", "ascending")])
    unique = _first_per_key(metrics)
    buffer = io.BytesIO()
    pq.write_table(unique, buffer)
    storage.write_atomic(storage.path(METRICS), buffer.getvalue())
    parts = {Path(f).stem for f in part_files}
    for shard in storage.list(storage.path(WEBDATASET), ".tar"):
        if Path(shard).stem not in parts:  # its block crashed before the record: the rows were redone elsewhere
            storage.fs.rm(shard)
    generated = int(pc.sum(pc.equal(unique["attempt"], attempt["attempt"])).as_py() or 0)
    scores = unique["score"]
    summary = {
        "rows": unique.num_rows, "expected": expected, "errors": int(unique.num_rows - unique["error"].null_count),
        "generated": generated, "duplicates_dropped": metrics.num_rows - unique.num_rows,
        "seconds": round(seconds, 3), "images_per_second": round(generated / seconds, 3) if seconds > 0 else None,
        "mean_score": pc.mean(scores).as_py() if scores.null_count < len(scores) else None,
    }
    attempt.update(ended_at=_now(), **summary)
    manifest.update(status="complete" if unique.num_rows == expected else "incomplete", counts=summary)
    _write_manifest(storage, manifest)
    return summary


def _first_per_key(metrics: pa.Table) -> pa.Table:
    """One row per (prompt_id, sample_idx) of a table sorted by key: the first (earliest attempt)."""
    if metrics.num_rows == 0:
        return metrics
    ids, samples = metrics["prompt_id"].to_pylist(), metrics["sample_idx"].to_pylist()
    keep = [i for i in range(len(ids)) if i == 0 or (ids[i], samples[i]) != (ids[i - 1], samples[i - 1])]
    return metrics.take(keep)


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
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
