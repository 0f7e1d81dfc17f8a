"""Benchmark: the run report (``jobs/run_report.py``) of a 10^5-row run costs seconds (not collected by pytest).

    python tests/benchmarks/run_report.py --rows 100000 --out report-bench.json [--layouts parquet,webdataset]

Per layout, a curated run (best-of-2) of ``--rows`` candidate rows is written through the real sink without Ray
(shards of 1,000 rows, 64x64 PNGs, random scores) and closed by ``finalize``; then the report is written and
timed. It reads the metrics table whole but only the ~80 images it shows (through the layout's read path), so
its time should not grow with the images. Reported per layout: ``write_seconds`` (building the run),
``report_seconds``, ``images_read`` and the report's peak RSS growth.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

SHARD = 1000


def build_run(root: Path, rows: int, layout: str) -> str:
    """A finished best-of-2 run of ``rows`` candidate rows under ``root / layout``; returns its ``--out``."""
    from PIL import Image

    from pipeline import manifest
    from pipeline.config import GenerateConfig
    from pipeline.curation import Curation
    from pipeline.shards import Shard
    from pipeline.sinks.datasink import SampleSink
    from pipeline.storage import Storage

    slots = rows // 2
    prompts = root / "prompts.parquet"
    if not prompts.exists():
        pq.write_table(pa.table({"prompt_id": [f"p{i:06d}" for i in range(slots)],
                                 "prompt": [f"shape number {i}" for i in range(slots)],
                                 "category": [f"kind-{i % 5}" for i in range(slots)]}), prompts)
    out = str(root / layout)
    config = GenerateConfig(job={"prompts": str(prompts), "out": out, "layout": layout, "best_of": 2,
                                 "scorer": "clip", "shard_size": SHARD})
    storage = Storage(out)
    record = manifest.start_attempt(storage, config, None, [str(prompts)], 0, SHARD)
    curation = Curation(best_of=2)
    sink = SampleSink(storage, {**dict.fromkeys(("model", "quantization", "sampler", "sampler_hash")),
                                "config_hash": config.config_hash(), "scorer": "clip", "attempt": 0}, "png",
                      layout=layout, curation=curation)
    rng = np.random.default_rng(0)
    pngs = []
    for level in range(16):
        buffer = io.BytesIO()
        Image.fromarray(np.full((64, 64, 3), level * 16, dtype=np.uint8)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    plan = []
    for start in range(0, slots, SHARD // 2):
        ids = [f"p{i:06d}" for i in range(start, min(slots, start + SHARD // 2))]
        count = 2 * len(ids)
        name = f"shard-{start:07d}"
        scores = rng.random(count)
        sink.write_table(pa.table({
            "prompt_id": [p for p in ids for _ in range(2)], "sample_idx": [0] * count,
            "candidate": [0, 1] * len(ids), "prompt": [f"shape number {p}" for p in ids for _ in range(2)],
            "negative_prompt": [""] * count, "seed": list(range(count)),
            "image": [pngs[int(s * 16)] for s in scores], "nfe": [16] * count, "gen_seconds": [0.1] * count,
            "error": [""] * count, "score": scores, "shard": [name] * count, "shard_samples": [count] * count}))
        plan.append(Shard(name, str(prompts), start, start + len(ids), count))
    manifest.finalize(sink, record, plan, 1.0)
    return out


def counted_report(run_report, out: str) -> tuple[dict, int]:
    """``run_report.write_run_report(out)`` and the number of images it read through the layout."""
    read = [0]
    original = run_report.build_sink

    def counting(*args, **kwargs):
        sink = original(*args, **kwargs)
        reader = sink.read_images

        def read_images(record):
            read[0] += record.num_rows
            return reader(record)

        sink.read_images = read_images
        return sink

    run_report.build_sink = counting
    try:
        return run_report.write_run_report(out), read[0]
    finally:
        run_report.build_sink = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--layouts", default="parquet,webdataset")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    args = parser.parse_args()
    from jobs import run_report

    results = {}
    with tempfile.TemporaryDirectory(prefix="maskray-report-bench-") as folder:
        for layout in args.layouts.split(","):
            began = time.perf_counter()
            out = build_run(Path(folder), args.rows, layout)
            built = time.perf_counter() - began
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            began = time.perf_counter()
            summary, read = counted_report(run_report, out)
            seconds = time.perf_counter() - began
            results[layout] = {"rows": args.rows, "write_seconds": round(built, 1), "report_seconds": round(seconds, 2),
                               "images_read": read, "kept_images": summary["kept_images"],
                               "peak_rss_growth_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                             - rss) / 1024, 1)}
            print(layout, json.dumps(results[layout]))
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
