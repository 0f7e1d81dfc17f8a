"""Bounded load test of the Serve endpoint on loopback: the openai client against an autoscaling generator.

Run on demand (pytest does not collect it; tests/test_serve.py runs its clients briefly and checks its statistics):

    python tests/benchmarks/serve_load.py [--clients 8] [--load-s 60] [--quiet-s 75] [--out FILE] [--plot PNG]
    python tests/benchmarks/serve_load.py --fake-autoscaler [--out FILE]

Load mode: a local Ray on 127.0.0.1 serves the tiny model on CPU with Serve autoscaling (``--min-replicas`` 1 to
``--max-replicas`` 3, ``--target`` ongoing requests per replica, short upscale/downscale delays). ``--clients``
openai clients send requests back to back for ``--load-s`` seconds, then ``--quiet-clients`` for ``--quiet-s``
seconds, so replicas grow under load and shrink while requests still run (in-flight requests on a replica being
removed must finish: Serve's graceful shutdown). A 429 is counted, its ``Retry-After`` checked and honoured.
The replica count is sampled from ``serve.status()`` every second and drawn as a PNG.

Fake-autoscaler mode: a head with Ray's fake multi-node autoscaler, whose GPU worker type starts at 0 nodes, and
a generator needing one GPU: one client asks until answered, retrying on 503 + ``Retry-After``; it reports the
time to the first answer and to the GPU node joining.

Every phase has a deadline and every request a client timeout, so the run stops by itself; a watchdog interrupts
it at ``--max-run-s`` whatever happens. Requests that never got an answer (client timeout, dropped connection,
still running at the end) are counted as lost. Prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import _thread
import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.loopback import free_port  # noqa: E402

# Serve's handles and replicas report their load to the autoscaler every 10 s by default: too coarse for a run of
# minutes. Set by main() before Ray starts (its processes inherit them), not on import (tests import this module).
ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
               "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}
APP = "maskray-load"
GENERATOR = "ImageGenerator"


@dataclass
class Outcome:
    """One request as the client saw it; ``status`` None means lost (no answer: timeout or dropped connection)."""

    phase: str
    sent_s: float  # since the run's start
    seconds: float
    status: int | None
    retry_after: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation, None without values."""
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarize(outcomes: list[Outcome], phase: str, seconds: float) -> dict:
    """Throughput, latency percentiles of the answered requests, 429/503 shares, 5xx and lost counts of a phase
    that lasted ``seconds``."""
    rows = [o for o in outcomes if o.phase == phase]
    ok = [o.seconds for o in rows if o.status == 200]
    refused = [o for o in rows if o.status in (429, 503)]
    return {"phase": phase, "requests": len(rows), "ok": len(ok), "images_per_s": len(ok) / seconds if seconds else 0,
            "p50_ms": _ms(percentile(ok, 50)), "p95_ms": _ms(percentile(ok, 95)), "p99_ms": _ms(percentile(ok, 99)),
            "429": sum(o.status == 429 for o in rows), "503": sum(o.status == 503 for o in rows),
            "share_429": sum(o.status == 429 for o in rows) / len(rows) if rows else 0.0,
            "refused_with_retry_after": sum(o.retry_after is not None for o in refused),
            "5xx_other": sum(o.status is not None and o.status >= 500 and o.status != 503 for o in rows),
            "other_4xx": sum(o.status is not None and 400 <= o.status < 500 and o.status != 429 for o in rows),
            "lost": sum(o.status is None for o in rows)}


def by_replicas(outcomes: list[Outcome], samples: list[dict], phase: str) -> dict[int, dict]:
    """Requests of ``phase`` and their 429s by the number of running replicas sampled last before each was sent."""
    rows: dict[int, dict] = {}
    for outcome in (o for o in outcomes if o.phase == phase):
        before = [s for s in samples if s["t_s"] <= outcome.sent_s]
        row = rows.setdefault(before[-1]["running"] if before else 0, {"requests": 0, "429": 0})
        row["requests"] += 1
        row["429"] += outcome.status == 429
    return dict(sorted(rows.items()))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def table(rows: list[dict]) -> str:
    """The phase summaries as a Markdown table."""
    cells = [("phase", "requests", "ok", "images/s", "p50 ms", "p95 ms", "p99 ms", "429 (share)",
              "with Retry-After", "5xx", "lost")]
    for r in rows:
        cells.append((r["phase"], r["requests"], r["ok"], f"{r['images_per_s']:.2f}",
                      *("-" if r[k] is None else f"{r[k]:.0f}" for k in ("p50_ms", "p95_ms", "p99_ms")),
                      f"{r['429']} ({100 * r['share_429']:.1f}%)",
                      f"{r['refused_with_retry_after']}/{r['429'] + r['503']}", r["5xx_other"], r["lost"]))
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(cells[0]))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


class Clients:
    """Client threads, each with its own openai client, sending one request after another until a deadline."""

    def __init__(self, url: str, start: float, request: dict, timeout_s: float, api_key: str = "unused-on-loopback"):
        self.url, self.start, self.request, self.timeout_s, self.api_key = url, start, request, timeout_s, api_key
        self.outcomes: list[Outcome] = []
        self.in_flight: dict[int, tuple[str, float]] = {}  # thread id -> (phase, sent) of its running request
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def run_phase(self, phase: str, clients: int, seconds: float, until_answered: bool = False) -> None:
        """``clients`` threads for ``seconds``; ``until_answered``: each stops at its first 200."""
        deadline = time.monotonic() + seconds
        batch = [threading.Thread(target=self._client, args=(phase, deadline, until_answered, i), daemon=True)
                 for i in range(clients)]
        for thread in batch:
            thread.start()
        self.threads += batch
        for thread in batch:
            thread.join(max(0.0, deadline - time.monotonic()) + self.timeout_s + 5)

    def finish(self) -> None:
        """Count requests still running (their thread outlived its deadline and timeout) as lost."""
        with self._lock:
            for phase, sent in self.in_flight.values():
                self.outcomes.append(Outcome(phase, sent, time.monotonic() - self.start - sent, None))
            self.in_flight.clear()

    def _client(self, phase: str, deadline: float, until_answered: bool, index: int) -> None:
        import openai

        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0,
                               timeout=self.timeout_s)
        seed = index * 1_000_000
        while time.monotonic() < deadline:
            seed += 1
            sent = time.monotonic() - self.start
            with self._lock:
                self.in_flight[threading.get_ident()] = (phase, sent)
            status, retry_after = 200, None
            try:
                client.images.generate(prompt=f"a red circle {seed}", size=self.request["size"],
                                       response_format="b64_json", extra_body={"seed": seed, **self.request["extra"]})
            except openai.APIStatusError as error:
                status, retry_after = error.status_code, error.response.headers.get("retry-after")
            except (openai.APITimeoutError, openai.APIConnectionError):
                status = None
            outcome = Outcome(phase, sent, time.monotonic() - self.start - sent, status, retry_after)
            with self._lock:
                self.in_flight.pop(threading.get_ident(), None)
                self.outcomes.append(outcome)
            if status == 200 and until_answered:
                return
            if status in (429, 503):  # as a well-behaved client would (the openai client's own retries are off)
                wait = float(retry_after) if retry_after and retry_after.isdigit() else 1.0
                time.sleep(max(0.0, min(wait, deadline - time.monotonic())))


class ReplicaSampler(threading.Thread):
    """Samples the generator's replica states in ``app`` from ``serve.status()`` every ``period_s`` until stopped."""

    def __init__(self, start: float, app: str = APP, period_s: float = 1.0):
        super().__init__(daemon=True)
        self.start_time, self.app, self.period_s = start, app, period_s
        self.samples: list[dict] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        from ray import serve

        while not self.stopped.is_set():
            try:
                deployment = serve.status().applications[self.app].deployments[GENERATOR]
                states = {str(getattr(k, "value", k)): v for k, v in deployment.replica_states.items()}
            except Exception:  # the app is not deployed yet (KeyError), or the controller is busy: no sample
                states = None
            if states is not None:
                self.samples.append({"t_s": round(time.monotonic() - self.start_time, 2),
                                     "running": states.get("RUNNING", 0), "states": states})
            self.stopped.wait(self.period_s)


def plot(samples: list[dict], phases: list[dict], path: Path, title: str) -> None:
    """Running generator replicas over time, the phases shaded, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=110)
    for phase, colour in zip(phases, ("#f4cccc", "#d9ead3", "#cfe2f3")):
        ax.axvspan(phase["from_s"], phase["to_s"], color=colour, alpha=0.6,
                   label=f"{phase['phase']} ({phase['clients']} client(s))")
    times = [s["t_s"] for s in samples]
    ax.step(times, [sum(s["states"].values()) for s in samples], where="post", color="grey", linestyle="--",
            label="replicas in any state (starting, stopping)")
    ax.step(times, [s["running"] for s in samples], where="post", color="black", label="running replicas")
    ax.set_xlabel("seconds")
    ax.set_ylabel("generator replicas")
    top = max([sum(s["states"].values()) for s in samples] + [1])
    ax.set_yticks(range(0, top + 1))
    ax.set_ylim(0, top + 1.8)  # room for the legend above the lines
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)



def serve_config(args: argparse.Namespace, gpus: float):
    from jobs.serve.config import ServeConfig

    return ServeConfig.model_validate({
        "model": {"model": args.model, "device": "cpu"}, "max_batch_size": args.max_ongoing,
        "max_ongoing_requests": args.max_ongoing, "max_queued_requests": args.max_queued,
        "min_replicas": args.min_replicas, "max_replicas": args.max_replicas, "target_ongoing_requests": args.target,
        "upscale_delay_s": args.upscale_delay_s, "downscale_delay_s": args.downscale_delay_s,
        "look_back_period_s": args.look_back_period_s, "retry_after_s": args.retry_after_s, "num_gpus": gpus,
        "startup_wait_s": args.startup_wait_s, "request_timeout_s": args.request_timeout_s,
        "api_key_env": "MASKRAY_LOAD_NO_KEY", "allow_unauthenticated": True})  # loopback: no key


def deploy(config, port: int, wait: bool) -> None:
    """Serve on 127.0.0.1:``port`` with the app of ``config``; ``wait``: until every deployment runs, else until
    the front door does (the generator may be waiting for a node)."""
    from ray import serve
    from ray.serve.api import RunTarget

    from jobs.serve.app import build_application

    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": config.request_timeout_s + 30})
    serve.run_many([RunTarget(build_application(config), name=APP, route_prefix="/")],
                   wait_for_applications_running=wait)
    while not wait:
        front = serve.status().applications[APP].deployments.get("ImagesAPI")
        if front is not None and str(getattr(front.status, "value", front.status)) == "HEALTHY":
            return
        time.sleep(0.5)


def request_settings(args: argparse.Namespace) -> dict:
    return {"size": args.size, "extra": {"steps": args.steps}}


def run_load(args: argparse.Namespace) -> dict:
    """The load mode (see the module doc): local Ray, load phase then quiet phase."""
    import ray

    port = free_port()
    config = serve_config(args, gpus=0)
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    try:
        deploy(config, port, wait=True)
        start = time.monotonic()
        sampler = ReplicaSampler(start)
        sampler.start()
        clients = Clients(f"http://127.0.0.1:{port}", start, request_settings(args), args.client_timeout_s)
        phases = []
        for phase, count, seconds in (("load", args.clients, args.load_s), ("quiet", args.quiet_clients, args.quiet_s)):
            begun = time.monotonic() - start
            clients.run_phase(phase, count, seconds)
            phases.append({"phase": phase, "clients": count, "from_s": round(begun, 2),
                           "to_s": round(time.monotonic() - start, 2)})
        clients.finish()
        sampler.stopped.set()
        sampler.join(5)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    rows = [summarize(clients.outcomes, p["phase"], p["to_s"] - p["from_s"]) for p in phases]
    return {"mode": "load", "config": config.model_dump(mode="json"), "request": request_settings(args),
            "clients": args.clients, "quiet_clients": args.quiet_clients, "phases": phases, "rows": rows,
            "load_by_replicas": by_replicas(clients.outcomes, sampler.samples, "load"),
            "outcomes": [asdict(o) for o in clients.outcomes],
            "replicas": sampler.samples, "peak_replicas": max((s["running"] for s in sampler.samples), default=0),
            "final_replicas": sampler.samples[-1]["running"] if sampler.samples else None}


def run_fake_autoscaler(args: argparse.Namespace) -> dict:
    """The fake-autoscaler mode (see the module doc): GPU nodes from zero, one client until its first answer."""
    import ray

    sys.path.insert(0, str(ROOT / "tests"))
    from test_autoscale import fake_head  # the fake multi-node head the autoscaling tests start

    types = {"ray.head.default": {"resources": {"CPU": 2, "GPU": 0}, "node_config": {}, "max_workers": 0},
             "ray.worker.gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                                "max_workers": 1}}
    config = serve_config(args, gpus=1).model_copy(update={"num_cpus": 1, "min_replicas": 1, "max_replicas": 1})
    port = free_port()
    with fake_head(types, max_workers=1, head_cpus=2) as cluster:
        os.environ["RAY_AUTH_MODE"] = cluster["env"]["RAY_AUTH_MODE"]  # the head's: loopback, no token
        ray.init(address=cluster["address"], log_to_driver=False)
        try:
            start = time.monotonic()  # every time of this mode counts from the deploy
            sampler = ReplicaSampler(start)
            sampler.start()
            joined: list[float] = []
            watcher = threading.Thread(target=_watch_gpu_node, args=(start, joined, args.cold_s), daemon=True)
            watcher.start()
            deploy(config, port, wait=False)
            front_door_up_s = round(time.monotonic() - start, 2)
            clients = Clients(f"http://127.0.0.1:{port}", start, request_settings(args), args.client_timeout_s)
            clients.run_phase("cold start", 1, args.cold_s, until_answered=True)
            clients.finish()
            sampler.stopped.set()
        finally:
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    outcomes = clients.outcomes
    first = next((o for o in outcomes if o.status == 200), None)
    row = summarize(outcomes, "cold start", (first.sent_s + first.seconds) if first else args.cold_s)
    return {"mode": "fake-autoscaler", "config": config.model_dump(mode="json"), "node_types": types,
            "request": request_settings(args), "front_door_up_s": front_door_up_s,
            "gpu_node_joined_s": joined[0] if joined else None,
            "first_answer_s": round(first.sent_s + first.seconds, 2) if first else None,
            "attempts": [asdict(o) for o in outcomes], "rows": [row], "replicas": sampler.samples}


def _watch_gpu_node(start: float, joined: list[float], seconds: float) -> None:
    """Append the time a node with a GPU is alive to ``joined`` (seconds since ``start``)."""
    import ray

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(n["Alive"] and n["Resources"].get("GPU") for n in ray.nodes()):
            joined.append(round(time.monotonic() - start, 2))
            return
        time.sleep(0.5)


def watchdog(seconds: float) -> threading.Timer:
    """Interrupts the main thread after ``seconds`` (the run's hard bound): its ``finally`` then shuts Serve down."""
    timer = threading.Timer(seconds, _thread.interrupt_main)
    timer.daemon = True
    timer.start()
    return timer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--fake-autoscaler", action="store_true", help="Run the GPU-nodes-from-zero mode instead.")
    p.add_argument("--model", default="tiny-meissonic", help="Model to serve (the tiny one needs no download).")
    p.add_argument("--clients", type=int, default=8, help="Concurrent clients of the load phase.")
    p.add_argument("--load-s", type=float, default=60, help="Seconds of the load phase.")
    p.add_argument("--quiet-clients", type=int, default=1, help="Clients of the quiet phase (replicas shrink).")
    p.add_argument("--quiet-s", type=float, default=75, help="Seconds of the quiet phase.")
    p.add_argument("--cold-s", type=float, default=240, help="Fake-autoscaler mode: seconds the client keeps asking.")
    p.add_argument("--client-timeout-s", type=float, default=60, help="Client timeout of one request.")
    p.add_argument("--size", default="64x64", help="Image size of every request.")
    p.add_argument("--steps", type=int, default=16, help="Sampling steps of every request.")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=3)
    p.add_argument("--target", type=float, default=2, help="Serve's target_ongoing_requests per replica.")
    p.add_argument("--max-ongoing", type=int, default=2, help="max_ongoing_requests (and max_batch_size) per replica.")
    p.add_argument("--max-queued", type=int, default=2, help="max_queued_requests: beyond it, a 429.")
    p.add_argument("--upscale-delay-s", type=float, default=3)
    p.add_argument("--downscale-delay-s", type=float, default=15)
    p.add_argument("--look-back-period-s", type=float, default=12)
    p.add_argument("--retry-after-s", type=int, default=1)
    p.add_argument("--startup-wait-s", type=float, default=1, help="The app's startup_wait_s (then a 503).")
    p.add_argument("--request-timeout-s", type=float, default=45, help="The app's request_timeout_s (then a 504).")
    p.add_argument("--ray-cpus", type=int, default=4, help="Logical CPUs of the local Ray (1 per replica).")
    p.add_argument("--max-run-s", type=float, default=900, help="Hard bound of the whole run.")
    p.add_argument("--out", default="serve_load.json", help="JSON file for the figures.")
    p.add_argument("--plot", help="PNG of the replica count over time (default: next to --out).")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    timer = watchdog(args.max_run_s)
    try:
        result = run_fake_autoscaler(args) if args.fake_autoscaler else run_load(args)
    finally:
        timer.cancel()
    result["machine"] = {"cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0]}
    print("\n" + table(result["rows"]))
    if args.fake_autoscaler:
        print(f"\nsince the deploy: front door up at {result['front_door_up_s']} s, GPU node joined at "
              f"{result['gpu_node_joined_s']} s, first answer at {result['first_answer_s']} s; attempts (sent at, "
              f"status, Retry-After): {[(a['sent_s'], a['status'], a['retry_after']) for a in result['attempts']]}")
    else:
        print(f"\nreplicas: peak {result['peak_replicas']}, at the end {result['final_replicas']}; load-phase 429s by "
              f"running replicas: {result['load_by_replicas']}")
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2))
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    title = ("fake autoscaler: a GPU node from zero (seconds since the deploy)" if args.fake_autoscaler else
             f"{args.model}, autoscaling {args.min_replicas}-{args.max_replicas} replicas, target {args.target:g}")
    phases = result.get("phases") or [{"phase": "cold start", "clients": 1, "from_s": result["front_door_up_s"],
                                       "to_s": result["first_answer_s"] or result["replicas"][-1]["t_s"]}]
    if result["replicas"]:
        plot(result["replicas"], phases, png, title)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
