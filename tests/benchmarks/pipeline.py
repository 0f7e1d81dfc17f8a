"""Benchmark: the ``maskray generate`` Ray Data pipeline against a plain in-process loop (not collected by pytest).

    python tests/benchmarks/pipeline.py [--prompts 64] [--batch-size 4] [--steps 16] [--size 64] [--actors N]

Both sides run the same ``actors.generator.Generator`` (tiny-meissonic, PNG encoding) at the same batch size
and the same torch threads per model copy (1: what Ray gives a 0.5-CPU actor). Steady-state throughput
excludes start-up on both sides: the loop is timed after the model has loaded (once before and once after the
pipeline, to bracket load from other processes); the pipeline from its first completion record to its last
(polled every 20 ms). Start-up (Ray up, then first record = actors ready + one batch) is reported separately,
as are Ray Data's per-operator wall times and the bytes per image that cross the object store (the Generator
stage's output blocks: encoded image + row columns).
Target (issue 5): pipeline >= 0.8x the plain loop at steady state.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray starts each 0.5-CPU actor with OMP_NUM_THREADS=1; give the loop the same environment before torch loads
# (torch.set_num_threads(1) alone left the in-process loop ~2x slower than the actor here).
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def load_generator(settings: dict, threads: int):
    from actors.generator import Generator

    started = time.perf_counter()
    generator = Generator({"model": "tiny-meissonic", "device": "cpu"}, settings, torch_threads=threads)
    return generator, time.perf_counter() - started


def plain_loop(generator, prompts: list[str], batch_size: int) -> float:
    """Images/s of the in-process loop (after one warm-up batch)."""
    generator({"prompt": np.array(prompts[:batch_size], dtype=object), "seed": np.arange(batch_size)})
    started = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generator({"prompt": np.array(chunk, dtype=object), "seed": np.arange(start, start + len(chunk))})
    return len(prompts) / (time.perf_counter() - started)


def ray_pipeline(prompts: list[str], batch_size: int, settings: dict, actors: int | None, root: Path) -> dict:
    started = time.perf_counter()
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_up = time.perf_counter() - started

    from pipeline import manifest
    from pipeline.config import GenerateConfig
    from pipeline.generate import Stages, WorkPlan, build_dataset, run_constants
    from pipeline.pools import plan_stages
    from pipeline.prompts import scan_prompts
    from pipeline.shards import default_shard_size, plan_shards
    from pipeline.sinks.datasink import SampleSink
    from pipeline.storage import Storage

    pq.write_table(pa.table({"prompt_id": [f"p{i:05d}" for i in range(len(prompts))], "prompt": prompts}),
                   root / "prompts.parquet")
    config = GenerateConfig.model_validate({"job": {"prompts": str(root / "prompts.parquet"), "out": str(root / "out"),
                                                    "batch_size": batch_size, "generator_actors": actors},
                                            "generation": settings})
    out, source = Storage(config.job.out), Storage(config.job.prompts)
    scan = scan_prompts(config.job.prompts, source, 1)
    generator, scorer = plan_stages(config, ray.cluster_resources())
    size = default_shard_size(scan.samples)
    plan = plan_shards(scan.files, scan.row_samples, size)
    parts = root / "out" / "_shards"
    seen: dict[str, tuple[float, int]] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for path in parts.glob("*.parquet") if parts.is_dir() else []:
                if path.name not in seen:
                    seen[path.name] = (time.perf_counter(), pq.read_metadata(path).num_rows)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    record = manifest.start_attempt(out, config, None, [source.uri], 0, size)
    begun = time.perf_counter()
    watcher.start()
    ds = build_dataset(config, WorkPlan(source, scan.columns, plan, plan, size), Stages(generator, scorer))
    sink = SampleSink(out, run_constants(config, 0), "png", "files", size)
    ds.write_datasink(sink)
    total = time.perf_counter() - begun
    time.sleep(0.1)
    stop.set()
    watcher.join()
    summary = manifest.finalize(sink, record, plan, total)
    metrics = pq.read_table(root / "out" / "metrics.parquet")
    times = sorted(seen.values())
    first, last = times[0][0], times[-1][0]
    steady_rows = sum(rows for _, rows in times[1:])
    stats = ds.stats()
    ray.shutdown()
    generated = re.search(r"MapBatches\(Generator\).*?Output size bytes per block:.*?(\d+) total", stats, re.S)
    return {"ray_up_s": ray_up, "first_record_s": first - begun, "seconds": total,
            "steady_images_per_s": steady_rows / (last - first) if last > first else float("nan"),
            "rows": summary.rows, "errors": summary.errors, "actors": generator.actors,
            "threads": generator.torch_threads or 1,
            "image_bytes": float(np.mean(metrics["image_bytes"].to_numpy())),
            "store_bytes_per_image": int(generated.group(1)) / summary.rows if generated else float("nan"),
            "gen_seconds_per_image": float(np.mean(metrics["gen_seconds"].to_numpy())), "stats": stats}


def operator_lines(stats: str) -> list[str]:
    """Ray Data's per-operator wall-time and output-size lines from ``Dataset.stats()``."""
    keep = re.compile(r"^Operator \d+|Remote wall time|Output size bytes per block|Output num rows per block|"
                      r"Total input num rows|Total output num rows|Total time")
    return [line.rstrip() for line in stats.splitlines() if keep.search(line)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=None, help="generator actors (default: the job's auto rule)")
    args = parser.parse_args()
    settings = {"steps": args.steps, "width": args.size, "height": args.size}
    prompts = [f"a tiny shape number {i}" for i in range(args.prompts)]
    threads = 1  # what Ray gives each generator actor here (OMP_NUM_THREADS = reserved CPUs, at least 1)
    with tempfile.TemporaryDirectory(prefix="maskray-bench-") as folder:
        os.environ.setdefault("MASKRAY_CACHE", str(Path(folder) / "cache"))
        generator, load = load_generator(settings, threads)
        before = plain_loop(generator, prompts, args.batch_size)
        pipe = ray_pipeline(prompts, args.batch_size, settings, args.actors, Path(folder))
        after = plain_loop(generator, prompts, args.batch_size)  # brackets load drift from other processes
    loop = (before + after) / 2
    ratio = pipe["steady_images_per_s"] / loop
    print(f"\n{args.prompts} images, batch {args.batch_size}, tiny-meissonic {args.size}x{args.size}, {args.steps} "
          f"steps, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    print("| | plain loop | Ray Data pipeline |")
    print("|---|---|---|")
    print(f"| start-up | model load {load:.1f} s | Ray up {pipe['ray_up_s']:.1f} s + first record "
          f"{pipe['first_record_s']:.1f} s (actors ready + 1 batch) |")
    print(f"| steady state | {loop:.2f} images/s ({threads} threads; {before:.2f} before, {after:.2f} after) | "
          f"{pipe['steady_images_per_s']:.2f} images/s ({pipe['actors']} actor(s) x {pipe['threads']} threads) |")
    print(f"| generator time / image | {1 / loop:.3f} s | {pipe['gen_seconds_per_image']:.3f} s |")
    print(f"| object-store bytes / image | - | {pipe['store_bytes_per_image']:.0f} B (PNG {pipe['image_bytes']:.0f} B "
          f"+ row columns) |")
    print(f"\npipeline / loop at steady state: {ratio:.2f}x (target >= 0.8x); pipeline end to end "
          f"{pipe['ray_up_s'] + pipe['seconds']:.1f} s; rows {pipe['rows']}, errors {pipe['errors']}\n")
    print("\n".join(operator_lines(pipe["stats"])))


if __name__ == "__main__":
    main()
