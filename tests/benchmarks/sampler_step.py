"""Per-step sampler cost without the model, and a full tiny-Meissonic generation (run on demand).

    python3 tests/benchmarks/sampler_step.py [--tokens 4096] [--codes 8192] [--steps 6] [--repeats 4]
                                             [--out bench-results/sampler_step.json]

Part 1 times the work a sampler does per step at Meissonic-1024 size (N = 4096 tokens x K = 8192 codes) with
a CFG pair: the CFG combine of a fresh `(2, K, 64, 64)` model output plus the step. Diffusers'
``AmusedScheduler.step`` (with the ``u + s (c - u)`` of ``AmusedPipeline``) and our vanilla, noise,
differential and noise+differential steps run in the same process over a generation of ``--steps`` steps,
each repeat in a rotated order. A repeat's figure is the median of the steps where every technique acts
(1..T-2); the table shows the best repeat of each strategy (the least disturbed by other processes on a
shared machine) and the ratio to our vanilla (diffusers: our vanilla / diffusers). It also reports the
memory differential sampling keeps per sample. Part 2 runs a whole tiny-Meissonic generation at 64 steps in a fresh process per
preset and reports its wall time and peak RSS. Not collected by pytest (the name is not ``test_*``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mgt.sampling import loop as sampling  # noqa: E402
from mgt.sampling.differential_sampling import DifferentialSampling  # noqa: E402
from mgt.sampling.sampler_config import SamplerConfig  # noqa: E402

GUIDANCE = 9.0
TARGETS = {"vanilla": 1.0, "noise": 1.3, "differential": 1.3, "noise+differential": 1.5}


def diffusers_steps(base: torch.Tensor, steps: int, mask_id: int, seed: int) -> list[float]:
    """Seconds per step of AmusedPipeline's CFG mix + AmusedScheduler.step on fresh model outputs."""
    from diffusers import AmusedScheduler

    scheduler = AmusedScheduler(mask_token_id=mask_id)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.full((1, base.shape[2], base.shape[3]), mask_id, dtype=torch.long)
    times = []
    for t in scheduler.timesteps:
        output = base.clone()  # the model's fresh output (not timed)
        start = time.perf_counter()
        uncond, cond = output.chunk(2)
        guided = uncond + GUIDANCE * (cond - uncond)
        tokens = scheduler.step(guided, t, tokens, generator=generator).prev_sample
        times.append(time.perf_counter() - start)
    return times


def our_steps(base: torch.Tensor, steps: int, mask_id: int, seed: int, spec: str) -> list[float]:
    """Seconds per step of our CFG combine + sampler step (the loop of ``sampling.sample``)."""
    started = [0.0]
    times = []

    def predict(tokens: torch.Tensor, step_value: int, scale: float) -> torch.Tensor:
        output = base.clone()  # the model's fresh output (not timed)
        started[0] = time.perf_counter()
        return sampling.apply_guidance(output, scale)

    shape = (1, base.shape[2], base.shape[3])
    sampling.sample(predict, shape, steps, [torch.Generator().manual_seed(seed)], mask_id,
                    SamplerConfig.from_spec(spec), guidance=GUIDANCE,
                    on_step=lambda i: times.append(time.perf_counter() - started[0]))
    return times


def differential_memory(tokens: int, codes: int) -> dict[str, int]:
    """Bytes of the tensors a DifferentialSampling object holds after two calls on one sample."""
    probs = torch.softmax(torch.randn(1, tokens, codes), -1)
    unknown = torch.ones(1, tokens, dtype=torch.bool)
    kept = {}
    for store in (True, False):
        diff = DifferentialSampling(store_modified_prev=store)
        diff(probs, unknown, False, torch.empty_like(probs))
        diff(probs, unknown, False, torch.empty_like(probs))
        held = [value for value in vars(diff).values() if isinstance(value, torch.Tensor)]
        kept[f"store_modified_prev={store}"] = sum(t.nbytes for t in held)
    return kept


def tiny_generation(preset: str, steps: int) -> dict:
    """Run in a fresh process: one tiny-Meissonic image at ``steps`` steps, wall time and peak RSS."""
    import mgt

    pipe = mgt.load_pipeline("tiny-meissonic", device="cpu")
    start = time.perf_counter()
    out = pipe.generate(["a red circle above a blue square"], [0], steps=steps,
                        sampler=SamplerConfig.from_spec(preset))
    seconds = time.perf_counter() - start
    return {"preset": preset, "steps": steps, "nfe": out.nfe, "seconds": round(seconds, 3),
            "peak_rss_mb": round(peak_rss_kb() / 1024, 1)}


def peak_rss_kb() -> int:
    """This process's peak RSS. VmHWM, because Linux carries ru_maxrss over exec from the parent process."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="N, a square number (64 x 64 at 1024 px).")
    parser.add_argument("--codes", type=int, default=8192, help="K, the codebook size.")
    parser.add_argument("--steps", type=int, default=6, help="Steps of the timed generation (>= 3).")
    parser.add_argument("--repeats", type=int, default=4, help="Repeats of every strategy, in rotated order.")
    parser.add_argument("--tiny-steps", type=int, default=64, help="Steps of the tiny-Meissonic generation.")
    parser.add_argument("--tiny-presets", default="vanilla,all", help="Comma-separated presets to time end to end.")
    parser.add_argument("--out", default="bench-results/sampler_step.json", help="Where to write the JSON.")
    parser.add_argument("--tiny-only", help=argparse.SUPPRESS)  # internal: one tiny generation, JSON to stdout
    args = parser.parse_args(argv)
    if args.tiny_only:
        print(json.dumps(tiny_generation(args.tiny_only, args.tiny_steps)))
        return 0

    side = int(args.tokens**0.5)
    if side * side != args.tokens or args.steps < 3:
        raise SystemExit(f"--tokens must be a square number (got {args.tokens}) and --steps >= 3 (got {args.steps})")
    mask_id = args.codes
    base = torch.randn(2, args.codes, side, side, generator=torch.Generator().manual_seed(0)) * 3
    strategies = ["diffusers", "vanilla", "noise", "differential", "noise+differential"]
    repeats: dict[str, list[float]] = {name: [] for name in strategies}  # median step time of each repeat
    first: dict[str, list[float]] = {name: [] for name in strategies}
    raw: dict[str, list[list[float]]] = {name: [] for name in strategies}
    for repeat in range(args.repeats):
        for name in strategies[repeat % len(strategies):] + strategies[:repeat % len(strategies)]:
            if name == "diffusers":
                per_step = diffusers_steps(base, args.steps, mask_id, seed=repeat)
            else:
                per_step = our_steps(base, args.steps, mask_id, repeat, name)
            repeats[name].append(statistics.median(per_step[1:-1]))
            first[name].append(per_step[0])
            raw[name].append([round(t, 4) for t in per_step])
            print(f"repeat {repeat} {name}: {repeats[name][-1]:.3f} s/step", file=sys.stderr)
    best = {name: min(values) for name, values in repeats.items()}
    rows = []
    for name in strategies:
        ratio = best["vanilla"] / best["diffusers"] if name == "diffusers" else best[name] / best["vanilla"]
        rows.append({"strategy": name, "median_step_s": round(best[name], 4),
                     "first_step_s": round(min(first[name]), 4), "ratio": round(ratio, 3),
                     "ratio_of": "our vanilla / diffusers" if name == "diffusers" else f"{name} / our vanilla",
                     "target": TARGETS.get("vanilla" if name == "diffusers" else name)})
    memory = differential_memory(args.tokens, args.codes)
    tiny = []
    for preset in filter(None, args.tiny_presets.split(",")):
        result = subprocess.run([sys.executable, __file__, "--tiny-only", preset, "--tiny-steps", str(args.tiny_steps)],
                                check=True, capture_output=True, text=True)
        tiny.append(json.loads(result.stdout.strip().splitlines()[-1]))

    print(f"\nper-step sampler cost, N={args.tokens} x K={args.codes}, CFG pair, {torch.get_num_threads()} threads, "
          f"median of steps 1..{args.steps - 2} of {args.steps}, best of {args.repeats} repeats")
    print(f"{'strategy':<20}{'s/step':>9}{'1st step':>10}{'ratio':>8}{'target':>8}  ratio of")
    for row in rows:
        target = "" if row["target"] is None else f"<={row['target']}"
        print(f"{row['strategy']:<20}{row['median_step_s']:>9.3f}{row['first_step_s']:>10.3f}{row['ratio']:>8.2f}"
              f"{target:>8}  {row['ratio_of']}")
    print("differential sampling state per sample: " +
          ", ".join(f"{k}: {v / 2**20:.1f} MiB" for k, v in memory.items()))
    for run in tiny:
        print(f"tiny-Meissonic {run['preset']}: {run['steps']} steps, NFE {run['nfe']}, {run['seconds']:.2f} s, "
              f"peak RSS {run['peak_rss_mb']:.0f} MB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tokens": args.tokens, "codes": args.codes, "steps": args.steps,
                               "repeats": args.repeats, "threads": torch.get_num_threads(), "steps_table": rows,
                               "seconds_per_step_raw": raw,
                               "differential_state_bytes_per_sample": memory, "tiny_meissonic": tiny}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
