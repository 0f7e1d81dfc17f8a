"""Benchmark of the Serve endpoint on the tiny model: HTTP latency against a direct call, and throughput.

Run on demand (pytest does not collect it): ``python tests/benchmarks/serve.py [--requests 24] [--out FILE]``.

- latency: p50/p95 of one image at a time, ``MGTPipeline.generate`` in this process against
  ``POST /v1/images/generations`` (ingress -> generator replica -> PNG + base64 -> JSON), alternating;
- throughput: images/s with 8 client threads, ``@serve.batch`` on (max_batch_size 8) and off (1).

The generator replica gets one CPU and Ray pins it to one torch thread, so the direct call runs with one
thread too. Prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.loopback import free_port  # noqa: E402

CONCURRENCY = 8
APP = "maskray-bench"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation, in the unit of ``values``."""
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def summary(name: str, seconds: list[float], images: int, wall: float) -> dict:
    return {"path": name, "requests": len(seconds), "p50_ms": 1000 * percentile(seconds, 50),
            "p95_ms": 1000 * percentile(seconds, 95), "images_per_s": images / wall}


def post(url: str, seed: int) -> float:
    """Seconds for one HTTP request of one image (raises on a non-2xx answer)."""
    import requests

    started = time.perf_counter()
    response = requests.post(f"{url}/v1/images/generations", json={"prompt": f"a red circle {seed}", "seed": seed},
                             timeout=300)
    response.raise_for_status()
    return time.perf_counter() - started


def bench_latency(pipe, url: str, count: int) -> list[dict]:
    """One image at a time, direct and HTTP alternating so both see the same load on a shared machine."""
    pipe.generate(["warm up"], [0])
    post(url, 0)
    direct, http = [], []
    for seed in range(count):
        started = time.perf_counter()
        pipe.generate([f"a red circle {seed}"], [seed])
        direct.append(time.perf_counter() - started)
        http.append(post(url, seed))
    return [summary("direct generate, 1 image", direct, count, sum(direct)),
            summary("HTTP, 1 request at a time", http, count, sum(http))]


def bench_direct_batched(pipe, count: int) -> dict:
    started = time.perf_counter()
    for first in range(0, count, CONCURRENCY):
        seeds = list(range(first, min(first + CONCURRENCY, count)))
        pipe.generate([f"a red circle {seed}" for seed in seeds], seeds)
    return {"path": f"direct generate, batches of {CONCURRENCY}", "requests": count, "p50_ms": None,
            "p95_ms": None, "images_per_s": count / (time.perf_counter() - started)}


def bench_concurrent(url: str, name: str, count: int) -> dict:
    """CONCURRENCY client threads; also the mean images per @serve.batch batch, from the replica's counters."""
    from ray import serve

    stats = serve.get_deployment_handle("ImageGenerator", app_name=APP).stats
    post(url, 0)  # warm up a freshly deployed replica
    before = stats.remote().result()
    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        seconds = list(pool.map(lambda seed: post(url, seed), range(count)))
    row = summary(name, seconds, count, time.perf_counter() - started)
    after = stats.remote().result()
    row["mean_batch"] = (after["images"] - before["images"]) / (after["batches"] - before["batches"])
    return row


def deploy(model: str, max_batch_size: int) -> None:
    from ray import serve

    from jobs.serve.app import build_app

    serve.run(build_app({"model": model, "max_batch_size": max_batch_size, "max_ongoing_requests": CONCURRENCY,
                         "max_queued_requests": -1,
                         "api_key_env": "MASKRAY_BENCH_NO_KEY", "allow_unauthenticated": True}),  # loopback, no auth
              name=APP, route_prefix="/")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-meissonic", help="Model to serve (default: tiny-meissonic).")
    parser.add_argument("--requests", type=int, default=32, help="Requests per measurement.")
    parser.add_argument("--out", default="serve_benchmark.json", help="JSON file for the figures.")
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    import mgt

    torch.set_num_threads(1)  # as the generator replica, which Ray gives OMP_NUM_THREADS=1
    pipe = mgt.load_pipeline(args.model, device="cpu")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(args.model, CONCURRENCY)
        rows = bench_latency(pipe, url, args.requests)
        rows.append(bench_direct_batched(pipe, args.requests))
        rows.append(bench_concurrent(url, f"HTTP, concurrency {CONCURRENCY}, batching on", args.requests))
        deploy(args.model, 1)
        rows.append(bench_concurrent(url, f"HTTP, concurrency {CONCURRENCY}, batching off", args.requests))
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\nmodel {args.model}, model-default settings, 1 image per request, {args.requests} requests\n")
    print(f"| {'path':<42} | {'p50 ms':>8} | {'p95 ms':>8} | {'images/s':>8} | {'mean batch':>10} |")
    print(f"|{'-' * 44}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 12}|")
    for row in rows:
        p50 = "-" if row["p50_ms"] is None else f"{row['p50_ms']:.0f}"
        p95 = "-" if row["p95_ms"] is None else f"{row['p95_ms']:.0f}"
        batch = f"{row['mean_batch']:.1f}" if "mean_batch" in row else "-"
        print(f"| {row['path']:<42} | {p50:>8} | {p95:>8} | {row['images_per_s']:>8.2f} | {batch:>10} |")
    Path(args.out).write_text(json.dumps({"model": args.model, "concurrency": CONCURRENCY, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
