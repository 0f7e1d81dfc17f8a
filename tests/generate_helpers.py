"""Helpers of the generate-job tests: job configs, prompt shards, and the exactly-once check."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def config(prompts: str, out: str, steps: int = 2, **job):
    """A ``GenerateConfig`` on the tiny model: 32x32 images, ``steps`` steps, batches of 2."""
    from pipeline.config import GenerateConfig

    return GenerateConfig.model_validate({"job": {"prompts": prompts, "out": out, "batch_size": 2, **job},
                                          "generation": {"steps": steps, "width": 32, "height": 32}})


def shards(folder: Path, count: int, per_shard: int, separator: str = "/") -> list[str]:
    """``count`` Parquet shards of ``per_shard`` prompts each; returns the prompt ids (``s<shard><sep>p<i>``)."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for shard in range(count):
        shard_ids = [f"s{shard}{separator}p{i}" for i in range(per_shard)]
        pq.write_table(pa.table({"prompt_id": shard_ids, "prompt": [f"shape {p}" for p in shard_ids]}),
                       folder / f"part-{shard}.parquet")
        ids += shard_ids
    return ids


def check_exactly_once(metrics: pa.Table, ids: list[str], num_images: int) -> None:
    keys = list(zip(metrics["prompt_id"].to_pylist(), metrics["sample_idx"].to_pylist()))
    assert sorted(keys) == sorted((p, i) for p in ids for i in range(num_images))


# The run constants of a sink that no run made: the sink and partial-shard tests hand it tables themselves.
SINK_RUN = {"model": "m", "quantization": "fp32", "sampler": "{}", "sampler_hash": "h", "config_hash": "c",
            "scorer": None, "attempt": 0}


def sink_rows(keys: list[tuple[str, int]], error: str = "") -> pa.Table:
    """Generator output rows of shard ``s`` (3 samples) for ``keys`` (prompt_id, sample_idx); ``error`` fails them all."""
    count = len(keys)
    return pa.table({"prompt_id": [k for k, _ in keys], "sample_idx": [i for _, i in keys],
                     "prompt": ["p"] * count, "negative_prompt": [""] * count, "seed": list(range(count)),
                     "image": [b"" if error else f"img-{k}-{i}".encode() for k, i in keys], "nfe": [2] * count,
                     "gen_seconds": [0.1] * count, "error": [error] * count, "shard": ["s"] * count,
                     "shard_samples": [3] * count})
