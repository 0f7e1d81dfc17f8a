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
