"""Cached-context steps (ReCAP) against vanilla, side by side in one run: counted transformer FLOPs per image,
CPU seconds per image at Meissonic-1024's token geometry, and (without ``--quick``) shapes-score rows.

    python tests/benchmarks/cached_context.py --quick --out cached_context.json   # under ten minutes here
    python tests/benchmarks/cached_context.py --out cached_context.json           # + the shapes quality rows

Geometry rows: a random-weight Meissonic at 64x64 tokens (1024 px with the VQ's f=16; the down block makes a
32x32 grid of 2x2 patches, 1024 positions, plus 77 text tokens), width 256 (4 heads of 64), 2 dual-stream and
6 single-stream blocks, codebook 1024, CFG on (two rows per forward, as Meissonic's 9), the same steps for
both. FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over the sampling loop only (the text
encoder runs before it), CPU attention included (``_scaled_dot_product_flash_attention_for_cpu`` is not in
torch's table, so it is mapped to torch's own ``sdpa_flop_count``).

Quality rows (full run): ``shapes-meissonic`` at its defaults (16 steps, CFG 1) on tuning captions (held-out
index 40,000 on; ``shapes_model.py``), paired per (caption, seed) against vanilla at the same steps, and
vanilla at fewer steps with the FLOPs ratio of each row, to draw the FLOPs-vs-score curve.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCHEDULES = ["vanilla:cache.full_every=2", "vanilla:cache.full_every=3", "vanilla:cache.full_every=4",
             "vanilla:cache.full_every=3,cache.full_first=1", "vanilla:cache.full_every=4,cache.full_first=1",
             "vanilla:cache.full_every=5,cache.full_first=1"]
FLOPS_TARGET = 0.55  # issue 48: transformer FLOPs per image at most 0.55x vanilla's


def flop_counter():
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa})


def geometry_model(tokens: int = 64):
    """The random-weight Meissonic of the geometry rows, as a pipeline (tiny text encoder, no VQ decode)."""
    import torch

    import mgt
    from mgt.models.meissonic import MeissonicTransformer

    pipe = mgt.load_pipeline("tiny-meissonic", device="cpu")
    torch.manual_seed(0)
    pipe.transformer = MeissonicTransformer(num_layers=2, num_single_layers=6, attention_head_dim=64,
                                            num_attention_heads=4, joint_attention_dim=32,
                                            pooled_projection_dim=256, axes_dims_rope=(16, 24, 24),
                                            vocab_size=1025, codebook_size=1024).eval()
    pipe.mask_token_id = 1024
    pipe.random_conditioning = True
    return pipe, (tokens, tokens)


def maskgit_geometry_model(depth: int = 4):
    """A random-weight MaskGIT at MaskGIT-256's geometry and width (16x16 tokens, width 768, 16 heads, MLP 3072,
    codebook 1024) but ``depth`` layers: every layer costs the same, so the FLOPs ratio is the full model's."""
    import torch

    import mgt
    from mgt.models.maskgit import MaskGitTransformer

    pipe = mgt.load_pipeline("tiny-maskgit", device="cpu")
    torch.manual_seed(0)
    pipe.transformer = MaskGitTransformer(tokens_per_side=16, depth=depth, dropout=0.0).eval()
    pipe.mask_token_id = pipe.transformer.mask_token_id
    return pipe, (16, 16)


def maskgit_rows(specs: list[str]) -> list[dict]:
    """Counted transformer FLOPs per image of ``specs`` over vanilla on MaskGIT-256's geometry, at the reference's
    settings (8 steps, CFG 4 on a linear ramp, the arccos count schedule)."""
    pipe, grid = maskgit_geometry_model()
    rows = []
    for spec in ["vanilla", *specs]:
        flops = run_sampler(pipe, grid, spec, pipe.defaults.steps, seed=0, guidance=pipe.defaults.guidance)[1]
        rows.append({"sampler": spec, "steps": pipe.defaults.steps, "flops_per_image": flops,
                     "flops_ratio": flops / (rows[0]["flops_per_image"] if rows else flops)})
        print(f"maskgit {spec}: {flops / 1e9:.1f} GFLOP, x{rows[-1]['flops_ratio']:.3f}", flush=True)
    return rows


def conditioning(pipe, guidance: float):
    """The pipeline's own conditioning of one prompt, or random tensors of the geometry model's shapes."""
    import torch

    if pipe.family == "maskgit":  # class-conditional: a class, and "no class" for guidance
        return pipe.conditioner.condition(["207"], 0, 0, torch.long, "cpu"), \
            pipe.conditioner.condition([""], 0, 0, torch.long, "cpu")
    if getattr(pipe, "random_conditioning", False):  # the geometry model: no matching text encoder
        g = torch.Generator().manual_seed(0)
        make = lambda: (torch.randn(1, 77, 32, generator=g), torch.randn(1, 256, generator=g),  # noqa: E731
                        torch.tensor([[1024.0, 1024, 0, 0, 6]]))
        return make(), make()
    positive = pipe.conditioner.condition(["a red circle above a blue square"], 64, 64, torch.float32, "cpu")
    return positive, (pipe.conditioner.condition([""], 64, 64, torch.float32, "cpu") if guidance > 1 else None)


def run_sampler(pipe, grid, spec: str, steps: int, seed: int, guidance: float = 9.0, count_flops: bool = True):
    """Tokens, counted FLOPs, wall and process CPU seconds of one image through the sampling loop (conditioning
    done first). CPU seconds (all threads) are what a busy shared machine disturbs least."""
    import torch

    import mgt
    from mgt.sampling import loop as sampling

    sampler = mgt.SamplerConfig.from_spec(spec).with_defaults(pipe.defaults.sampler)
    positive, negative = conditioning(pipe, guidance)
    predict = partial(pipe.guided_logits, positive, negative, torch.tensor([0]))
    counter = flop_counter() if count_flops else None
    patch = pipe.transformer.token_grid_multiple  # as MGTPipeline.generate passes it
    started, cpu_started = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        if counter is not None:
            with counter:
                result = sampling.sample(predict, (1, *grid), steps, pipe.make_generators([seed]), pipe.mask_token_id,
                                         sampler, guidance=guidance, cache_patch=patch)
        else:
            result = sampling.sample(predict, (1, *grid), steps, pipe.make_generators([seed]), pipe.mask_token_id,
                                     sampler, guidance=guidance, cache_patch=patch)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return result.tokens, (counter.get_total_flops() if counter else None), seconds, cpu_seconds


def geometry_rows(specs: list[str], steps: int, repeats: int) -> list[dict]:
    pipe, grid = geometry_model()
    rows = []
    for spec in ["vanilla", *specs]:
        flops = run_sampler(pipe, grid, spec, steps, seed=0)[1]
        timed = [run_sampler(pipe, grid, spec, steps, seed=r, count_flops=False)[2:] for r in range(repeats)]
        seconds, cpu_seconds = min(t[0] for t in timed), min(t[1] for t in timed)
        rows.append({"sampler": spec, "steps": steps, "flops_per_image": flops, "seconds_per_image": seconds,
                     "cpu_seconds_per_image": cpu_seconds})
        print(f"geometry {spec}: {flops / 1e9:.1f} GFLOP, {seconds:.2f} s wall, {cpu_seconds:.2f} s CPU", flush=True)
    base = rows[0]
    for row in rows:
        row["flops_ratio"] = row["flops_per_image"] / base["flops_per_image"]
        row["seconds_ratio"] = row["seconds_per_image"] / base["seconds_per_image"]
        row["cpu_seconds_ratio"] = row["cpu_seconds_per_image"] / base["cpu_seconds_per_image"]
    return rows


def shapes_flops_ratio(pipe, spec: str, steps: int) -> float:
    """Counted FLOPs of ``spec`` over vanilla at 16 steps on the shapes model's own geometry (one image)."""
    grid = (pipe.defaults.height // pipe.vae_scale_factor, pipe.defaults.width // pipe.vae_scale_factor)
    flops = run_sampler(pipe, grid, spec, steps, seed=0, guidance=pipe.defaults.guidance)[1]
    base = run_sampler(pipe, grid, "vanilla", pipe.defaults.steps, seed=0, guidance=pipe.defaults.guidance)[1]
    return flops / base


def quality_rows(specs: list[str], fewer_steps: list[int], count: int, seeds: int) -> list[dict]:
    """Shapes scores on tuning captions, paired per (caption, seed) against vanilla at the default steps."""
    import numpy as np

    import mgt
    from shapes.scorer import ShapesScorer
    from tests.benchmarks.shapes_model import captions_and_seeds, measure

    captions, seed_list = captions_and_seeds(True, count, seeds)
    pipe = mgt.load_pipeline("shapes-meissonic", device="cpu")
    scorer = ShapesScorer(device="cpu")
    steps = pipe.defaults.steps
    runs = [("vanilla", steps)] + [(s, steps) for s in specs] + [("vanilla", n) for n in fewer_steps]
    base = None
    rows = []
    for spec, n in runs:
        result = measure(pipe, scorer, captions, seed_list, None, n, mgt.SamplerConfig.from_spec(spec))
        scores = np.array([s["score"] for s in result["per_sample"]])
        base = scores if base is None else base
        diff = scores - base
        boot = np.random.default_rng(0).choice(diff, (2000, diff.size)).mean(1)
        rows.append({"sampler": spec, "steps": n, "mean_score": float(scores.mean()),
                     "diff_vs_vanilla": float(diff.mean()),
                     "diff_ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
                     "flops_ratio": shapes_flops_ratio(pipe, spec, n), "samples": int(scores.size)})
        print(f"shapes {spec} @ {n}: mean {scores.mean():.4f} diff {diff.mean():+.4f} "
              f"[{rows[-1]['diff_ci95'][0]:+.4f}, {rows[-1]['diff_ci95'][1]:+.4f}] "
              f"flops x{rows[-1]['flops_ratio']:.3f}", flush=True)
    return rows


def choose_schedule(quality: list[dict]) -> dict:
    """The rule fixed before the evaluation run: of the schedules within the FLOPs target on the tuning
    captions, the one of highest mean paired difference against vanilla; none within it: the cheapest."""
    cached = [r for r in quality if "cache" in r["sampler"]]
    within = [r for r in cached if r["flops_ratio"] <= FLOPS_TARGET]
    return max(within, key=lambda r: r["diff_vs_vanilla"]) if within else min(cached, key=lambda r: r["flops_ratio"])


def paired_runs(candidate_run: str, baseline_run: str) -> dict:
    """Mean paired score difference (bootstrap 95 % interval) of two ``maskray evaluate`` runs over the same
    prompts and seeds, e.g. a cached schedule at 16 steps against vanilla at fewer steps (another ``--steps``)."""
    import numpy as np
    import pyarrow.parquet as pq

    def scores(run: str):
        table = pq.read_table(Path(run) / "metrics.parquet", columns=["prompt_id", "sample_idx", "score", "error"])
        return {(p, i): s for p, i, s, e in zip(*(table[c].to_pylist() for c in table.column_names)) if e is None}

    a, b = scores(candidate_run), scores(baseline_run)
    keys = sorted(a.keys() & b.keys())
    diff = np.array([a[k] - b[k] for k in keys])
    boot = np.random.default_rng(0).choice(diff, (2000, diff.size)).mean(1)
    return {"candidate": candidate_run, "baseline": baseline_run, "pairs": len(keys),
            "mean_difference": float(diff.mean()), "ci95": [float(np.quantile(boot, 0.025)),
                                                            float(np.quantile(boot, 0.975))],
            "win_rate": float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))}


def schedule_label(spec: str) -> str:
    """``k=3`` or ``k=3,P=1`` for a cached schedule's spec (``vanilla:cache.full_every=3,cache.full_first=1``)."""
    fields = dict(part.split("=") for part in spec.split(":", 1)[1].split(","))
    label = f"k={fields.get('cache.full_every', 2)}"
    return label + (f",P={fields['cache.full_first']}" if "cache.full_first" in fields else "")


def plot_curve(report: dict, evaluation: list[dict], path: str) -> None:
    """FLOPs ratio against paired score difference: the tuning rows (cached schedules and vanilla at fewer
    steps) and the evaluation-caption points ``evaluation`` (``{"label", "flops_ratio", "mean_difference",
    "ci95"}``), with their 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=110)
    for kind, marker, color in (("cache", "o", "tab:blue"), ("vanilla", "s", "tab:gray")):
        rows = [r for r in report["quality_rows"] if ("cache" in r["sampler"]) == (kind == "cache")]
        rows = [r for r in rows if r["sampler"] != "vanilla" or r["steps"] != 16]
        if not rows:
            continue
        x = [r["flops_ratio"] for r in rows]
        y = [r["diff_vs_vanilla"] for r in rows]
        err = [[r["diff_vs_vanilla"] - r["diff_ci95"][0] for r in rows], [r["diff_ci95"][1] - r["diff_vs_vanilla"]
                                                                            for r in rows]]
        ax.errorbar(x, y, yerr=err, fmt=marker, color=color, capsize=3, alpha=0.6,
                    label="cached, 16 steps (tuning)" if kind == "cache" else "vanilla, fewer steps (tuning)")
        for r in rows:
            label = schedule_label(r["sampler"]) if kind == "cache" else f"T={r['steps']}"
            ax.annotate(label, (r["flops_ratio"], r["diff_vs_vanilla"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    for point in evaluation:
        ax.errorbar([point["flops_ratio"]], [point["mean_difference"]],
                    yerr=[[point["mean_difference"] - point["ci95"][0]], [point["ci95"][1] - point["mean_difference"]]],
                    fmt="D", color="tab:red", capsize=3)
        ax.annotate(point["label"], (point["flops_ratio"], point["mean_difference"]), textcoords="offset points",
                    xytext=(-5, -3), ha="right", fontsize=7, color="tab:red")  # left: the tuning labels are right
    ax.axhline(0, color="black", lw=0.6)
    ax.axhline(-0.02, color="tab:red", lw=0.6, ls=":")
    ax.axvline(FLOPS_TARGET, color="tab:red", lw=0.6, ls=":")
    ax.set_xlabel("transformer FLOPs per image / vanilla 16 steps")
    ax.set_ylabel("paired shapes-score difference")
    ax.set_title("shapes-meissonic: cached context vs fewer steps", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Geometry rows of vanilla and recap only.")
    parser.add_argument("--steps", type=int, default=16, help="Steps of the geometry rows (Meissonic: 64).")
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs per row (the fastest counts).")
    parser.add_argument("--count", type=int, default=100, help="Tuning captions of the quality rows.")
    parser.add_argument("--seeds", type=int, default=2, help="Seeds per tuning caption.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="cached_context.json")
    parser.add_argument("--pair", nargs=2, metavar=("CANDIDATE_RUN", "BASELINE_RUN"), help="Only pair two "
                        "maskray evaluate run folders (runs/<sampler>-<hash>) by prompt and sample and print the "
                        "paired difference.")
    parser.add_argument("--plot", nargs=2, metavar=("REPORT_JSON", "PNG"), help="Only draw the FLOPs-vs-score "
                        "curve of a full run's report (its 'evaluation' list adds the evaluation-caption points).")
    args = parser.parse_args()
    if args.plot:
        report = json.loads(Path(args.plot[0]).read_text())
        plot_curve(report, report.get("evaluation", []), args.plot[1])
        return
    if args.pair:
        print(json.dumps(paired_runs(*args.pair), indent=2))
        return

    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)
    specs = ["recap"] if args.quick else ["recap", *SCHEDULES]
    geometry = geometry_rows(specs, args.steps, args.repeats)
    recap = next(r for r in geometry if r["sampler"] == "recap")  # the preset, whatever the list holds
    report = {"flops_ratio": recap["flops_ratio"], "seconds_ratio": recap["seconds_ratio"],
              "cpu_seconds_ratio": recap["cpu_seconds_ratio"],
              "geometry": {"tokens": "64x64", "width": 256, "dual_blocks": 2, "single_blocks": 6, "heads": 4,
                           "codebook": 1024, "guidance": 9.0, "steps": args.steps, "threads": args.threads},
              "geometry_rows": geometry, "maskgit_rows": maskgit_rows(specs)}
    if not args.quick:
        report["quality_rows"] = quality_rows(SCHEDULES, [8, 9, 10], args.count, args.seeds)
        report["chosen"] = choose_schedule(report["quality_rows"])
        report["equal_flops_steps"] = round(16 * report["chosen"]["flops_ratio"])
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("flops_ratio", "seconds_ratio")}))


if __name__ == "__main__":
    main()
