"""Benchmark of the Serve endpoint on the tiny model: HTTP latency against a direct call, and throughput.

Run on demand (pytest does not collect it): ``python tests/benchmarks/serve.py [--requests 24] [--out FILE]``.

- latency: p50/p95 of one image at a time, ``MGTPipeline.generate`` in this process against
  ``POST /v1/images/generations`` (ingress -> generator replica -> PNG + base64 -> JSON);
- throughput: images/s with 8 client threads, ``@serve.batch`` on (max_batch_size 8) and off (1).

The generator replica gets one CPU and Ray pins it to one torch thread, so the direct call runs with one
thread too. Prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

CONCURRENCY = 8
APP = "maskray-bench"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation, in the unit of ``values``."""
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def summary(name: str, seconds: list[float], images: int, wall: float) -> dict:
    return {"path": name, "requests": len(seconds), "p50_ms": 1000 * percentile(seconds, 50),
            "p95_ms": 1000 * percentile(seconds, 95), "images_per_s": images / wall}


def bench_direct(model: str, requests: int) -> list[dict]:
    import torch

    import mgt

    torch.set_num_threads(1)
    pipe = mgt.load_pipeline(model, device="cpu")
    pipe.generate(["warm up"], [0])
    seconds = []
    for seed in range(requests):
        started = time.perf_counter()
        pipe.generate([f"a red circle {seed}"], [seed])
        seconds.append(time.perf_counter() - started)
    rows = [summary("direct generate, 1 image", seconds, len(seconds), sum(seconds))]
    started = time.perf_counter()
    for first in range(0, requests, CONCURRENCY):
        seeds = list(range(first, min(first + CONCURRENCY, requests)))
        pipe.generate([f"a red circle {seed}" for seed in seeds], seeds)
    wall = time.perf_counter() - started
    rows.append({"path": f"direct generate, batches of {CONCURRENCY}", "requests": requests, "p50_ms": None,
                 "p95_ms": None, "images_per_s": requests / wall})
    return rows


def bench_http(url: str, name: str, requests_count: int, concurrency: int) -> dict:
    import requests

    def one(seed: int) -> float:
        started = time.perf_counter()
        response = requests.post(f"{url}/v1/images/generations", json={"prompt": f"a red circle {seed}",
                                 "seed": seed}, timeout=300)
        response.raise_for_status()
        return time.perf_counter() - started

    one(0)  # warm up the replica and the connection path
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        seconds = list(pool.map(one, range(requests_count)))
    return summary(name, seconds, requests_count, time.perf_counter() - started)


def deploy(model: str, max_batch_size: int) -> None:
    from ray import serve

    from jobs.serve.app import build_app

    serve.run(build_app({"model": model, "max_batch_size": max_batch_size, "max_ongoing_requests": CONCURRENCY,
                         "max_queued_requests": -1, "api_key_env": "MASKRAY_BENCH_NO_KEY"}),
              name=APP, route_prefix="/")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-meissonic", help="Model to serve (default: tiny-meissonic).")
    parser.add_argument("--requests", type=int, default=24, help="Requests per measurement.")
    parser.add_argument("--out", default="serve_benchmark.json", help="JSON file for the figures.")
    args = parser.parse_args()

    rows = bench_direct(args.model, args.requests)
    import ray
    from ray import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(args.model, CONCURRENCY)
        rows.append(bench_http(url, "HTTP, 1 request at a time (batching on)", args.requests, 1))
        rows.append(bench_http(url, f"HTTP, concurrency {CONCURRENCY}, batching on", args.requests, CONCURRENCY))
        deploy(args.model, 1)
        rows.append(bench_http(url, f"HTTP, concurrency {CONCURRENCY}, batching off", args.requests, CONCURRENCY))
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\nmodel {args.model}, model-default settings, 1 image per request, {args.requests} requests\n")
    print(f"| {'path':<42} | {'p50 ms':>8} | {'p95 ms':>8} | {'images/s':>8} |")
    print(f"|{'-' * 44}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for row in rows:
        p50 = "-" if row["p50_ms"] is None else f"{row['p50_ms']:.0f}"
        p95 = "-" if row["p95_ms"] is None else f"{row['p95_ms']:.0f}"
        print(f"| {row['path']:<42} | {p50:>8} | {p95:>8} | {row['images_per_s']:>8.2f} |")
    Path(args.out).write_text(json.dumps({"model": args.model, "concurrency": CONCURRENCY, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
