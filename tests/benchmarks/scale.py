"""Benchmark: ``maskray generate``'s bookkeeping at 10^4..10^6+ samples, stub generator (not collected by pytest).

    python tests/benchmarks/scale.py --samples 1000000 --storage s3 --out scale-1e6-s3.json [--delay 0]
    python tests/benchmarks/scale.py --samples 100000 --storage s3 --prefill --compare-layouts --out cmp.json

The real pipeline (``pipeline.generate.run_generate``: shard plan, Ray Data read -> expand -> repartition ->
actor pool -> ``SampleSink`` -> finalize) runs with ``StubGenerator`` plugged in as its generator stage: a
fixed 8x8 PNG per sample and an optional fixed sleep per batch, so the figures are the pipeline's and its
bookkeeping's, not a model's. Storage is a local folder or the S3 protocol: a ``moto_server`` subprocess on
127.0.0.1 (its memory is not the driver's). Images go to WebDataset tars (``--layout webdataset``, the layout
for millions of samples: a million files would measure the object store's PUT rate) or to Parquet shards
(``--layout parquet``). ``--compare-layouts`` runs the benchmark once per layout, each in a process of its own
(so each driver's peak memory is its own), with the same shard size, and reports both and their ratios
(parquet / webdataset) of resume, finalize and driver memory.

Three runs into one ``--out``: a fresh run; a rerun with nothing left to do; a rerun after deleting
``--delete-shards`` completion records (what a crash that lost that many shards leaves). With ``--prefill``
the fresh run is replaced by writing every shard through ``SampleSink.write_table`` in a separate process
(same files, no Ray), so resume, finalize and driver memory at 10^6+ samples are measured in minutes; the
fresh run's rate then comes from a smaller ``--samples`` run. Reported (JSON and a
table): ``samples``, ``records`` (shard records), ``generate_seconds``, ``samples_per_second`` and
``seconds_per_sample`` (fresh run), ``ideal_samples_per_second`` (actors x batch / delay, with ``--delay``;
give a ``--batch-size`` that divides the shard size, since a shard's last batch is otherwise partial and the
stub sleeps as long for it),
``resume_seconds`` (rerun with nothing left: from its start until it knows what is left, Ray start excluded),
``steady_samples_per_second`` (from the first piece written to the last, start-up excluded; the fraction of
ideal is given for both rates), ``ray_start_seconds``, ``finalize_seconds`` (fresh run, and ``finalize_seconds_rerun``),
``regenerated_after_deleting`` (samples the third run generated), ``regenerated_after_crash`` (the samples a
crash at the worst moment of the fresh run makes a rerun regenerate: the most shards seen in flight under
``_pieces/`` times their size), ``driver_peak_rss_mib``.
Targets (issue 22): at 10^6 on S3, resume <= 30 s, finalize <= 60 s, driver RSS <= 1024 MiB; seconds per
sample at 10^6 within 1.3x of 10^4; with a delay that makes the stub the bottleneck, >= 0.9x its ideal rate.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tests.loopback import free_port  # noqa: E402

PROMPT_FILES = 10


class StubGenerator:
    """A generator stage with ``actors.generator.Generator``'s constructor and columns, no model.

    Every row gets the same 8x8 PNG; each call sleeps ``delay`` seconds (a fixed model time per batch).
    """

    delay = 0.0

    def __init__(self, model: dict, settings: dict, **options):
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
        self.image = buffer.getvalue()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        if self.delay:
            time.sleep(self.delay)
        count = len(batch["prompt"])
        out = dict(batch)
        out["image"] = np.array([self.image] * count, dtype=object)
        out["nfe"] = np.zeros(count, dtype=np.int64)
        out["gen_seconds"] = np.full(count, (time.perf_counter() - started) / max(count, 1))
        out["error"] = np.array([""] * count, dtype=object)
        return out


def stub_stage(delay: float) -> type:
    """``StubGenerator`` with its per-batch delay (a class, as Ray Data's actor stages take one)."""
    return type("StubGenerator", (StubGenerator,), {"delay": delay})



def start_moto() -> tuple[subprocess.Popen, dict]:
    port = free_port()
    server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return server, options


def write_prompts(folder: Path, samples: int, row_group: int) -> None:
    """``samples`` prompts (one image each) over ``PROMPT_FILES`` files, row groups of ``row_group``."""
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-samples // PROMPT_FILES)
    for index in range(PROMPT_FILES):
        ids = np.arange(index * per_file, min(samples, (index + 1) * per_file))
        if len(ids):
            table = pa.table({"prompt_id": [f"https://example.com/prompts/{i:09d}" for i in ids],
                              "prompt": [f"a small red square number {i}" for i in ids]})
            pq.write_table(table, folder / f"part-{index:03d}.parquet", row_group_size=row_group)


class InFlight:
    """Samples the number of shards under ``_pieces/`` (started, not yet recorded) every 0.5 s."""

    def __init__(self, out):
        self.out, self.most, self.stop = out, 0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        folder = self.out.path("_pieces")
        while not self.stop.wait(0.5):
            try:
                if self.out.local:
                    count = len(os.listdir(folder)) if os.path.isdir(folder) else 0
                else:
                    self.out.fs.invalidate_cache(folder)
                    count = len(self.out.fs.ls(folder)) if self.out.fs.exists(folder) else 0
            except FileNotFoundError:
                count = 0
            self.most = max(self.most, count)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def prefill(config, stage: type, processes: int = 2) -> None:
    """Write every shard's record (and tar) as a finished run would, through the real sink, without Ray."""
    from multiprocessing import get_context

    from pipeline import manifest
    from pipeline.prompts import scan_prompts
    from pipeline.shards import default_shard_size, plan_shards
    from pipeline.storage import Storage

    job = config.job
    prompts = Storage(job.prompts, job.storage_options)
    scan = scan_prompts(job.prompts, prompts, job.num_images)
    from pipeline.sinks.registry import SinkBuilder

    most = SinkBuilder.config_type(job.layout).default_max_shard_size
    size = job.shard_size or default_shard_size(scan.samples, most)
    plan = plan_shards(scan.files, scan.row_samples, size)
    out = Storage(job.out, job.storage_options)
    manifest.start_attempt(out, config, None, [prompts.uri], 0, size)
    chunks = [plan[i::processes] for i in range(processes)]
    with get_context("spawn").Pool(processes) as pool:
        pool.starmap(_prefill_shards, [(config, stage, chunk, scan.columns) for chunk in chunks])


def _prefill_shards(config, stage: type, shards: list, columns: list[str]) -> None:
    from pipeline.generate import run_constants
    from pipeline.prompts import expand_samples
    from pipeline.shards import read_shards
    from pipeline.sinks.datasink import SampleSink
    from pipeline.storage import Storage

    job = config.job
    prompts, out = Storage(job.prompts, job.storage_options), Storage(job.out, job.storage_options)
    sink = SampleSink(out, run_constants(config, 0), job.image_format, job.layout)
    generator = stage(model={}, settings={})
    for shard in shards:
        descriptor = pa.Table.from_pylist([{"name": shard.name, "file": shard.file, "start": shard.start,
                                            "stop": shard.stop, "samples": shard.samples}])
        rows = read_shards(descriptor, storage=prompts, columns=columns)
        batch = expand_samples({c: rows[c].to_numpy(zero_copy_only=False) for c in rows.column_names},
                               run_seed=job.seed, num_images=job.num_images)
        sink.write_table(pa.table(generator(batch)))


def steady_rate(out) -> float | None:
    """Samples/s between the first and the last piece written (``written_at``), start-up and first piece excluded."""
    from pipeline.manifest import read_metrics

    stamps = read_metrics(out, ["written_at"])["written_at"].cast("int64").to_numpy()
    first, last = stamps.min(), stamps.max()
    return float((stamps > first).sum() / ((last - first) / 1000)) if last > first else None


def run(args: argparse.Namespace, root: Path) -> dict:
    import ray

    from pipeline.config import GenerateConfig
    from pipeline.generate import run_generate
    from pipeline.storage import Storage

    server, options = (None, {}) if args.storage == "local" else start_moto()
    try:
        write_prompts(root / "prompts", args.samples, args.row_group)
        prompts, out_uri = str(root / "prompts"), str(root / "out")
        if server is not None:
            import s3fs

            fs = s3fs.S3FileSystem(**options)
            fs.mkdir("bench")
            fs.put(prompts + "/", "bench/prompts/", recursive=True)
            prompts, out_uri = "s3://bench/prompts/", "s3://bench/out"
        config = GenerateConfig.model_validate({
            "job": {"prompts": prompts, "out": out_uri, "batch_size": args.batch_size, "layout": args.layout,
                    "shard_size": args.shard_size, "generator_actors": args.actors, "storage_options": options},
            "model": {"device": "cpu"}, "generation": {"steps": 1, "width": 8, "height": 8}})
        stage = stub_stage(args.delay)
        if args.prefill:
            began = time.perf_counter()
            prefill(config, StubGenerator)
            prefill_seconds = time.perf_counter() - began
        started = time.perf_counter()
        ray.init(address="local", include_dashboard=False, num_cpus=args.ray_cpus, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_start = time.perf_counter() - started
        out = Storage(out_uri, options)
        quiet = lambda _: None  # noqa: E731
        with InFlight(out) as watch:
            fresh = None if args.prefill else run_generate(config, log=quiet, generator_stage=stage)
        assert args.prefill or fresh.rows == args.samples, fresh
        steady = None if args.prefill else steady_rate(out)
        rerun = run_generate(config, log=quiet, generator_stage=stage)
        assert rerun.rows == args.samples and rerun.generated == 0, rerun
        records = out.list(out.path("_shards"), ".parquet")
        for path in records[:: max(1, len(records) // args.delete_shards)][: args.delete_shards]:
            out.fs.rm(path)
        redo = run_generate(config, log=quiet, generator_stage=stage)
        assert redo.rows == args.samples, redo
        ray.shutdown()
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    shard_size = -(-rerun.expected // rerun.shards)
    generate = None if args.prefill else fresh.timings["generate_seconds"]
    result = {
        "samples": args.samples, "storage": args.storage, "layout": args.layout, "records": len(records),
        "shard_size": shard_size,
        "batch_size": args.batch_size, "actors": args.actors, "delay": args.delay,
        "prefill_seconds": round(prefill_seconds, 1) if args.prefill else None, "generate_seconds": generate,
        "samples_per_second": round(args.samples / generate, 2) if generate else None,
        "seconds_per_sample": generate / args.samples if generate else None,
        "ideal_samples_per_second": round(args.actors * args.batch_size / args.delay, 2) if args.delay else None,
        "ray_start_seconds": round(ray_start, 3), "resume_seconds": rerun.timings["resume_seconds"],
        "resume_seconds_fresh": None if args.prefill else fresh.timings["resume_seconds"],
        "finalize_seconds": (rerun if args.prefill else fresh).timings["finalize_seconds"],
        "finalize_seconds_rerun": rerun.timings["finalize_seconds"],
        "regenerated_after_deleting": redo.generated, "deleted_shards": args.delete_shards,
        "regenerated_after_crash": None if args.prefill else watch.most * shard_size,
        "shards_in_flight_max": watch.most, "regenerate_seconds": redo.timings["generate_seconds"],
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
    }
    if steady:
        result["steady_samples_per_second"] = round(steady, 2)
    if args.delay and steady:
        result["fraction_of_ideal"] = round(result["samples_per_second"] / result["ideal_samples_per_second"], 3)
        result["steady_fraction_of_ideal"] = round(steady / result["ideal_samples_per_second"], 3)
    return result


def table(result: dict) -> str:
    keys = ["samples", "storage", "records", "generate_seconds", "samples_per_second", "resume_seconds",
            "ray_start_seconds", "finalize_seconds", "driver_peak_rss_mib", "regenerated_after_crash",
            "regenerated_after_deleting"] + (["fraction_of_ideal", "steady_fraction_of_ideal"] if result.get("delay")
                                             else [])
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                      "| " + " | ".join(str(result[k]) for k in keys) + " |"])


COMPARED = ("resume_seconds", "finalize_seconds", "finalize_seconds_rerun", "driver_peak_rss_mib")


def compare_layouts(args: argparse.Namespace) -> None:
    """This benchmark once per layout in a child process (same arguments and shard size); writes both results and
    parquet / webdataset ratios of ``COMPARED`` to ``args.out``."""
    results = {}
    shard_size = args.shard_size or 1000  # one size for both layouts: the comparison is of the layouts' costs
    for layout in ("webdataset", "parquet"):
        child = Path(args.out).with_suffix(f".{layout}.json")
        argv = [a for a in sys.argv[1:] if a != "--compare-layouts"]
        argv = _set(_set(_set(argv, "--layout", layout), "--out", str(child)), "--shard-size", str(shard_size))
        subprocess.run([sys.executable, __file__, *argv], check=True)
        results[layout] = json.loads(child.read_text())
    ratios = {key: round(results["parquet"][key] / results["webdataset"][key], 3) for key in COMPARED
              if results["webdataset"].get(key)}
    Path(args.out).write_text(json.dumps({**results, "parquet_over_webdataset": ratios}, indent=2))
    print("parquet / webdataset:", json.dumps(ratios))


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag value`` replacing any earlier value of ``flag``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return [*out, flag, value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--storage", choices=["local", "s3"], default="local")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--delay", type=float, default=0.0, help="stub seconds per batch (0: no model time)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=None, help="default: the job's rule")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--row-group", type=int, default=1000, help="rows per Parquet row group of the prompts")
    parser.add_argument("--delete-shards", type=int, default=3)
    parser.add_argument("--prefill", action="store_true", help="write the shards without Ray instead of a fresh "
                        "run (measures resume, finalize and memory at scale quickly)")
    parser.add_argument("--layout", choices=["webdataset", "parquet"], default="webdataset")
    parser.add_argument("--compare-layouts", action="store_true", help="run webdataset then parquet, each in its own "
                        "process, and report their ratios")
    args = parser.parse_args()
    if args.compare_layouts:
        compare_layouts(args)
        return
    with tempfile.TemporaryDirectory(prefix="maskray-scale-") as folder:
        result = run(args, Path(folder))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
