"""GPU throughput of Meissonic-1024 (issue 27): seconds per 64-step 1024x1024 image, memory, FLOP utilisation.

    python tests/benchmarks/gpu.py --out bench-results/gpu.json                          # one GPU, < 5 minutes
    python tests/benchmarks/gpu.py --device cpu --smoke --out bench-results/gpu-smoke.json   # ~1 minute on a CPU

Builds the Meissonic-1024 transformer from its hub config (``MeissonFlow/Meissonic`` ``transformer/config.json``,
1.007 B parameters) with random weights, directly on the device in bf16, and times ``MGTPipeline.generate``
with ``decode=False``: the product's own path (micro-batches, CFG 9, the vanilla sampler with one generator
per sample). The CLIP text encoder is replaced by fixed random embeddings of its output shapes: it runs once
per prompt, not once per step, and its ~0.7 GB of bf16 weights are not loaded.

Settings, in this order (``--budget`` skips the ones left when time is up, and lists them as skipped):

* variants: bf16 eager; bf16 compiled (``mgt.efficient.options.apply_compile``); TomeMGT 0.25 eager; w8a8 and w4a8
  (optimum-quanto, activation scales calibrated on one self-generated image; quanto cannot be compiled, see
  ``mgt.efficient.quant_config.check_compile``); TomeMGT 0.25 compiled (its dual-stream blocks stay eager);
* per variant: batch 1, 4 and 8, each with ``micro_batch`` 1 (one forward per sample's CFG pair) and
  whole-batch (one forward per step; the same thing at batch 1);
* cached-context rows (issue 48): vanilla and ``recap`` over every step of one bf16 image (3 steps with
  ``--smoke``: one full and two local steps), seconds and counted transformer FLOPs per image, and ratios.

Each setting runs one warm-up step (compilation, kernel selection), then ``--timed-steps`` steps. The time
per step is extrapolated to 64 steps (every step runs the same forward over every token, so steps cost the
same) and divided by the batch. The VQ decoder (the released Meissonic VQ config, random weights, bf16 as
the pipeline loads it, resident throughout) is timed apart, after the bf16 settings: per image at micro-batch
1 and whole-batch.

Per setting: seconds per image (wall; also the process's CPU seconds, all threads, which a busy shared CPU
disturbs less), peak device memory (CUDA ``max_memory_allocated`` over the timed steps,
weights included; not measured on CPU) and the fraction of the device's peak dense bf16 rate. FLOPs are
those of the dense model, counted with ``torch.utils.flop_counter`` on the meta device (matmuls,
convolutions, attention): the same count for every variant, so TomeMGT and quantized rows are effective
rates. The peak comes from ``PEAK_BF16_TFLOPS`` by ``torch.cuda.get_device_name()`` or ``--peak-tflops``.

``--smoke`` runs every setting on a reduced config (2 + 2 blocks of width 256, a codebook of 1024, a narrow VQ,
128x128 images: an 8x8 token grid, 4x4 in the down-sampled blocks; 2 timed steps), on a CPU with one torch thread
and dynamic-shape compilation (``smoke_on_a_shared_cpu``). Not collected by pytest; ``tests/test_gpu_benchmark.py``
runs the smoke path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffusers import VQModel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from mgt.efficient import options as efficient  # noqa: E402
from mgt.efficient.quant_config import SCQConfig  # noqa: E402
from mgt.models.meissonic import MeissonicTransformer  # noqa: E402
from mgt.models.text import TextConditioner  # noqa: E402
from mgt.pipeline import MGTPipeline, ModelDefaults  # noqa: E402

# MeissonFlow/Meissonic transformer/config.json and vqvae/config.json (the keys our classes take).
MEISSONIC_1024 = dict(attention_head_dim=128, axes_dims_rope=(16, 56, 56), codebook_size=8192, downsample=True,
                      guidance_embeds=False, in_channels=64, joint_attention_dim=1024, num_attention_heads=8,
                      num_layers=14, num_single_layers=28, patch_size=1, pooled_projection_dim=1024, upsample=True,
                      vocab_size=8256)
MEISSONIC_VQ = dict(act_fn="silu", block_out_channels=(128, 256, 256, 512, 768),
                    down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5,
                    in_channels=3, out_channels=3, latent_channels=64, layers_per_block=2, lookup_from_codebook=True,
                    mid_block_add_attention=False, norm_num_groups=32, norm_type="group", num_vq_embeddings=8192,
                    sample_size=32, scaling_factor=0.18215, vq_embed_dim=None, force_upcast=True)
FULL = dict(transformer=MEISSONIC_1024, vq=MEISSONIC_VQ, size=1024, timed_steps=16)
SMOKE = dict(transformer=dict(MEISSONIC_1024, attention_head_dim=64, axes_dims_rope=(8, 28, 28), num_attention_heads=4,
                              joint_attention_dim=256, pooled_projection_dim=256, num_layers=2, num_single_layers=2,
                              codebook_size=1024, vocab_size=1025),
             vq=dict(MEISSONIC_VQ, block_out_channels=(32, 32, 32, 64, 64), layers_per_block=1, num_vq_embeddings=1024),
             size=128, timed_steps=2)
STEPS = 64  # Meissonic's steps per image (the released scripts and the paper)
BATCHES = (1, 4, 8)
TEXT_LENGTH = 77

# Dense (no sparsity) bf16 tensor-core peaks of NVIDIA's datasheets, TFLOP/s, matched in this order as
# substrings of torch.cuda.get_device_name() (so "H100 PCIe" before "H100", "L40S" before "L4").
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.4),
                    ("H200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0),
                    ("L4", 121.0))


@dataclasses.dataclass(frozen=True)
class Variant:
    """How the transformer is prepared, in ``load_pipeline``'s order: quantize, TomeMGT, compile."""

    name: str
    quant: str | None = None
    tome: float = 0.0
    compile: bool = False

    @property
    def eager_name(self) -> str:
        return self.name.removesuffix("+compile")


VARIANTS = (Variant("bf16"), Variant("bf16+compile", compile=True), Variant("tome0.25", tome=0.25),
            Variant("w8a8", quant="w8a8"), Variant("w4a8", quant="w4a8"),
            Variant("tome0.25+compile", tome=0.25, compile=True))


class RandomText(TextConditioner):
    """Fixed random embeddings in place of the CLIP text encoder (``TextConditioner.encode``'s shapes)."""

    def __init__(self, width: int, pooled_width: int, device: torch.device):
        super().__init__(tokenizer=None, text_encoder=None, max_length=TEXT_LENGTH)
        generator = torch.Generator(device=device).manual_seed(0)
        self.hidden = torch.randn(TEXT_LENGTH, width, generator=generator, device=device, dtype=torch.bfloat16)
        self.pooled = torch.randn(pooled_width, generator=generator, device=device, dtype=torch.bfloat16)

    def encode(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        count = len(prompts)
        return self.hidden.expand(count, -1, -1), self.pooled.expand(count, -1)


def build(cls: type, config: dict, device: torch.device) -> torch.nn.Module:
    """``cls(**config)`` initialised in bf16 directly on ``device`` (seeded: every variant gets the same weights)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def forward_flops(config: dict, size: int, vq_scale: int) -> int:
    """FLOPs of one forward of a CFG pair (2 rows) at ``size`` px, counted on the meta device."""
    grid = size // vq_scale
    with torch.device("meta"):
        model = MeissonicTransformer(**config)
        inputs = (torch.zeros(2, grid, grid, dtype=torch.long),
                  torch.zeros(2, TEXT_LENGTH, config["joint_attention_dim"]),
                  torch.zeros(2, config["pooled_projection_dim"]), torch.zeros(2, 5), torch.zeros(1, dtype=torch.long))
        with FlopCounterMode(display=False) as counter:
            model(*inputs)
    return counter.get_total_flops()


def device_peak(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(peak dense bf16 TFLOP/s, where it came from)."""
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "unknown for this device: pass --peak-tflops"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"table: {key}"
    return None, f"{name} is not in PEAK_BF16_TFLOPS: pass --peak-tflops"


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def make_pipeline(transformer: torch.nn.Module, vqvae: VQModel, text: RandomText, size: int) -> MGTPipeline:
    defaults = ModelDefaults(steps=STEPS, guidance=9.0, negative_prompt="", width=size, height=size)
    return MGTPipeline("meissonic", transformer, vqvae, text, defaults, transformer.mask_token_id, name="random")


def prepare(variant: Variant, config: dict, device: torch.device, calibration: list, compile_mode: str | None):
    """The variant's transformer, prepared as ``load_pipeline`` does (quantize -> TomeMGT -> compile)."""
    transformer = build(MeissonicTransformer, config["transformer"], device)
    if variant.quant:
        from mgt.efficient.scq import apply_preset

        apply_preset(transformer, variant.quant, calibration)
    efficient.apply_tome(transformer, variant.tome)
    if variant.compile:
        efficient.apply_compile(transformer, compile_mode)
    return transformer


def time_setting(pipe: MGTPipeline, batch: int, micro_batch: int | None, timed_steps: int) -> dict:
    """One warm-up step, then ``timed_steps`` steps, extrapolated to ``STEPS`` steps per image."""
    pipe.micro_batch = micro_batch
    prompts, seeds = [f"prompt {i}" for i in range(batch)], list(range(batch))
    started = time.perf_counter()
    pipe.generate(prompts, seeds, steps=1, decode=False)
    warmup = time.perf_counter() - started
    reset_peak_memory(pipe.device)
    started, cpu_started = time.perf_counter(), time.process_time()
    pipe.generate(prompts, seeds, steps=timed_steps, decode=False)  # returns tokens on the host: synchronised
    per_step = (time.perf_counter() - started) / timed_steps
    cpu_per_step = (time.process_time() - cpu_started) / timed_steps
    return {"seconds_per_image": per_step * STEPS / batch, "seconds_per_step": per_step,
            "cpu_seconds_per_image": cpu_per_step * STEPS / batch, "warmup_seconds": warmup,
            "peak_memory_gib": peak_memory_gib(pipe.device)}


def time_decode(pipe: MGTPipeline, batch: int, micro_batch: int | None) -> dict:
    """``pipe.decode`` of ``batch`` random token grids, after one warm-up decode."""
    pipe.micro_batch = micro_batch
    scale = pipe.vae_scale_factor
    side = pipe.defaults.width // scale
    tokens = torch.randint(0, pipe.vqvae.config.num_vq_embeddings, (batch, side, side),
                           generator=torch.Generator().manual_seed(0))
    row = {"batch": batch, "micro_batch": micro_batch}
    try:
        pipe.decode(tokens)
        reset_peak_memory(pipe.device)
        started = time.perf_counter()
        pipe.decode(tokens)  # returns numpy images: synchronised
        row.update(seconds_per_image=(time.perf_counter() - started) / batch,
                   peak_memory_gib=peak_memory_gib(pipe.device))
    except torch.OutOfMemoryError:
        row.update(seconds_per_image=None, skipped="out of device memory")
    return row


def cached_context_rows(device: torch.device, config: dict, steps: int) -> list[dict]:
    """Vanilla and the ``recap`` preset (cached-context steps, ReCAP) over all ``steps`` steps of one bf16 image:
    seconds per image (wall, not extrapolated: local steps cost less than full ones) and transformer FLOPs per
    image counted over the run (``torch.utils.flop_counter``, CPU attention mapped as in cached_context.py)."""
    from cached_context import flop_counter

    from mgt.sampling.sampler_config import SamplerConfig

    text = RandomText(config["transformer"]["joint_attention_dim"], config["transformer"]["pooled_projection_dim"],
                      device)
    with torch.device("meta"):  # only its config is read: nothing is decoded
        vqvae = VQModel(**config["vq"])
    pipe = make_pipeline(build(MeissonicTransformer, config["transformer"], device), vqvae, text, config["size"])
    pipe.generate(["warm-up"], [0], steps=1, decode=False)
    rows = []
    for spec in ("vanilla", "recap"):
        sampler = SamplerConfig.from_spec(spec)
        started = time.perf_counter()
        pipe.generate(["a prompt"], [0], steps=steps, sampler=sampler, decode=False)
        seconds = time.perf_counter() - started
        with flop_counter() as counter:
            pipe.generate(["a prompt"], [0], steps=steps, sampler=sampler, decode=False)
        rows.append({"sampler": spec, "steps": steps, "seconds_per_image": seconds,
                     "flops_per_image": counter.get_total_flops()})
    for row in rows:
        row["seconds_ratio"] = row["seconds_per_image"] / rows[0]["seconds_per_image"]
        row["flops_ratio"] = row["flops_per_image"] / rows[0]["flops_per_image"]
        print(f"cached context {row['sampler']:>8}: {row['seconds_per_image']:.2f} s/image "
              f"(x{row['seconds_ratio']:.2f}), {row['flops_per_image'] / 1e12:.3f} TFLOP (x{row['flops_ratio']:.2f})")
    return rows


def batch_settings() -> list[tuple[int, int | None]]:
    """(batch, micro_batch) pairs: micro-batch 1 and whole-batch per batch (the same at batch 1)."""
    return [(batch, micro) for batch in BATCHES for micro in (1, None) if not (batch == 1 and micro is None)]


def run(device: torch.device, config: dict, timed_steps: int, budget: float | None, compile_mode: str | None,
        flops_per_image: float, peak_tflops: float | None) -> tuple[list[dict], list[dict]]:
    """Every setting of every variant in order, then the VQ decode rows; skips what is left past ``budget``."""
    started = time.perf_counter()
    text = RandomText(config["transformer"]["joint_attention_dim"], config["transformer"]["pooled_projection_dim"],
                      device)
    vqvae = build(VQModel, config["vq"], device)  # resident beside the transformer, as in a loaded pipeline
    rows, decode_rows, calibration = [], [], []
    for variant in VARIANTS:
        pending = batch_settings()
        if budget and time.perf_counter() - started > budget:
            rows += [skipped(variant, batch, micro, "time budget") for batch, micro in pending]
            continue
        print(f"{variant.name}: preparing", flush=True)
        try:
            pipe = make_pipeline(prepare(variant, config, device, calibration, compile_mode), vqvae, text,
                                 config["size"])
            for batch, micro in pending:
                if budget and time.perf_counter() - started > budget:
                    rows.append(skipped(variant, batch, micro, "time budget"))
                    continue
                row = dict(setting(variant, batch, micro), **time_setting(pipe, batch, micro, timed_steps))
                row["fraction_of_peak"] = (flops_per_image / row["seconds_per_image"] / (peak_tflops * 1e12)
                                           if peak_tflops else None)
                rows.append(row)
                print(f"  batch {batch} micro_batch {micro}: {row['seconds_per_image']:.3f} s/image "
                      f"(warm-up {row['warmup_seconds']:.1f} s)", flush=True)
            if variant.name == "bf16":
                calibration = calibration_batches(pipe)
                decode_rows = [time_decode(pipe, 1, 1), time_decode(pipe, BATCHES[-1], None)]
        except Exception as error:  # one broken variant must not lose the others' figures
            print(f"  {variant.name} failed: {type(error).__name__}: {error}", flush=True)
            done = {(r["batch"], r["micro_batch"]) for r in rows if r["variant"] == variant.name}
            rows += [dict(skipped(variant, b, m, "error"), error=f"{type(error).__name__}: {error}")
                     for b, m in pending if (b, m) not in done]
        pipe = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_speedups(rows)
    return rows, decode_rows


def calibration_batches(pipe: MGTPipeline) -> list:
    """One self-generated image (2 steps), masked once: enough for realistic A8 scales, cheap to make."""
    from mgt.efficient.scq import self_distillation_batches

    pipe.micro_batch = 1
    return self_distillation_batches(pipe, ["calibration"], SCQConfig(views_per_prompt=1, generation_steps=2))


def setting(variant: Variant, batch: int, micro_batch: int | None) -> dict:
    return {"name": f"{variant.name} b{batch} {'micro1' if micro_batch else 'whole'}", "variant": variant.name,
            "compiled": variant.compile, "quant": variant.quant, "tome": variant.tome, "batch": batch,
            "micro_batch": micro_batch}


def skipped(variant: Variant, batch: int, micro_batch: int | None, reason: str) -> dict:
    return dict(setting(variant, batch, micro_batch), seconds_per_image=None, skipped=reason)


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_eager`` (wall) and ``cpu_speedup_vs_eager`` (CPU seconds) of every compiled row over its
    eager twin (same batch and micro-batch)."""
    eager = {(r["variant"], r["batch"], r["micro_batch"]): r for r in rows if not r["compiled"]}
    for row in rows:
        if row["compiled"]:
            variant = next(v for v in VARIANTS if v.name == row["variant"])
            base = eager.get((variant.eager_name, row["batch"], row["micro_batch"]), {})
            for key, measure in (("speedup_vs_eager", "seconds_per_image"),
                                 ("cpu_speedup_vs_eager", "cpu_seconds_per_image")):
                row[key] = base[measure] / row[measure] if base.get(measure) and row.get(measure) else None


def print_table(rows: list[dict], decode_rows: list[dict]) -> None:
    print(f"\n{'setting':28} {'s/image':>9} {'CPU s/img':>10} {'warm-up s':>10} {'peak GiB':>9} {'% peak':>7} "
          f"{'vs eager':>9}")
    for r in rows:
        if r["seconds_per_image"] is None:
            print(f"{r['name']:28} skipped: {r.get('error') or r['skipped']}")
            continue
        memory = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
        fraction = f"{100 * r['fraction_of_peak']:.1f}" if r["fraction_of_peak"] is not None else "-"
        speedup = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else ""
        print(f"{r['name']:28} {r['seconds_per_image']:9.3f} {r['cpu_seconds_per_image']:10.3f} "
              f"{r['warmup_seconds']:10.1f} {memory:>9} {fraction:>7} {speedup:>9}")
    for r in decode_rows:
        label = f"VQ decode b{r['batch']} {'micro1' if r['micro_batch'] else 'whole'}"
        if r["seconds_per_image"] is None:
            print(f"{label:28} skipped: {r['skipped']}")
        else:
            memory = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
            print(f"{label:28} {r['seconds_per_image']:9.3f} {'':>10} {'':>10} {memory:>9}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    parser.add_argument("--smoke", action="store_true", help="reduced config: about a minute on a CPU")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--timed-steps", type=int, help="steps timed per setting, extrapolated to 64 "
                        "(default: 16; 2 with --smoke)")
    parser.add_argument("--budget", type=float, help="seconds after which the remaining settings are skipped "
                        "(default: 270 on a GPU, so the run stays under five minutes; none with --smoke or on CPU)")
    parser.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune",
                                                   "max-autotune-no-cudagraphs"],
                        help="torch.compile mode of the compiled variants (default: mgt.efficient.options.compile_mode)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s (default: from "
                        "PEAK_BF16_TFLOPS by device name)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is visible; use --device cpu")
    config = SMOKE if args.smoke else FULL
    timed_steps = args.timed_steps or config["timed_steps"]
    budget = args.budget if args.budget is not None else (270.0 if device.type == "cuda" and not args.smoke else None)
    compile_mode = args.compile_mode or efficient.compile_mode(device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # random weights can drive activations into slow denormal floats
    if args.smoke and device.type == "cpu":
        smoke_on_a_shared_cpu()
    started = time.perf_counter()

    vq_scale = 2 ** (len(config["vq"]["block_out_channels"]) - 1)
    flops_per_image = forward_flops(config["transformer"], config["size"], vq_scale) * STEPS
    peak_tflops, peak_source = device_peak(device, args.peak_tflops)
    notes = [(f"timed {timed_steps} of {STEPS} steps per setting after one warm-up step, extrapolated to {STEPS} "
              "steps (every step runs the same forward)"),
             "text encoder replaced by fixed random embeddings (not loaded, not timed)",
             (f"FLOPs of the dense model, {flops_per_image / STEPS / 1e12:.3f} TFLOP per CFG-pair forward, for "
              "every variant")]
    if args.smoke:
        notes.append("smoke: reduced config (2 + 2 blocks of width 256, codebook 1024, 128x128 images), "
                     "not Meissonic-1024")
    print(f"{'smoke' if args.smoke else 'Meissonic-1024'} on {device} ({device_name(device)}), compile mode "
          f"{compile_mode}; {notes[0]}", flush=True)
    rows, decode_rows = run(device, config, timed_steps, budget, compile_mode, flops_per_image, peak_tflops)
    print_table(rows, decode_rows)
    # smoke: 3 steps (one full, two local) keep the rows cheap; the savings grow with the steps (Meissonic: 64)
    cached_rows = cached_context_rows(device, config, 3 if args.smoke else STEPS)
    for note in notes:
        print(f"note: {note}")

    result = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "smoke": args.smoke, "size": config["size"], "steps": STEPS,
              "timed_steps": timed_steps, "extrapolated": timed_steps != STEPS, "dtype": "bf16",
              "compile_mode": compile_mode, "transformer_config": config["transformer"], "vq_config": config["vq"],
              "parameters": sum(p.numel() for p in build_meta(config["transformer"]).parameters()),
              "flops_per_image": flops_per_image, "peak_tflops": peak_tflops, "peak_tflops_source": peak_source,
              "settings": rows, "vq_decode": decode_rows, "cached_context": cached_rows, "notes": notes,
              "total_seconds": time.perf_counter() - started}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} ({result['total_seconds']:.0f} s)")
    return 1 if any("error" in r for r in rows) else 0


def smoke_on_a_shared_cpu() -> None:
    """Keep the CPU smoke run near a minute on a cold cache, also when something else uses the machine's cores.

    One torch thread: with a thread per core, any other busy process stalls every op at an OpenMP barrier (2
    threads on a loaded 2-core machine ran each setting 15x to 60x slower). Dynamic shapes from the first call:
    each block class compiles once, instead of static at micro-batch 1 and again dynamic at the first whole
    batch (a quarter less compile CPU time on a cold inductor cache)."""
    torch.set_num_threads(1)
    torch._dynamo.config.assume_static_by_default = False


def build_meta(config: dict) -> MeissonicTransformer:
    with torch.device("meta"):
        return MeissonicTransformer(**config)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
