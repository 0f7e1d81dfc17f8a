"""Efficient inference (arXiv 2411.10781 §4, issue 4): quantized weight bytes, checkpoint load time, TomeMGT speed.

    python3 tests/benchmarks/efficiency.py [--parts memory,tome] [--layers 14 --single-layers 28] [--tome-blocks 5]
                                           [--repeats 3]
                                           [--out bench-results/efficiency.json]

Part 1 builds the full Meissonic-1024 transformer config (1.007 B parameters) on the meta device,
materialises it in bf16 with random weights (normal, std 0.02) and, per preset, quantizes a copy with
:func:`mgt.efficient.quantization.quantize_transformer` + ``freeze`` and counts the bytes of every saved tensor
(int data, scales, shifts, activation scales, float tensors) against bf16. Calibration does not
change sizes, so the A8 presets are measured uncalibrated; ``scq`` has exactly ``w4a8``'s layout.
Targets: w8* <= 0.55x bf16, w4* <= 0.32x bf16.

Part 2 saves the bf16 transformer (safetensors) and the w8a16 and w4a8 checkpoints, then times loading
each (bf16: ``mgt.hub.loading.load_component``; quantized: ``mgt.efficient.quantized_checkpoint.load_quantized``),
best of ``--repeats``, files warm in the page cache.

Part 3 times a stack of ``--tome-blocks`` dual-stream ``FluxTransformerBlock``s at Meissonic-1024 widths
(inner dim 1024 = 8 heads x 128, 32x32 = 1024 image + 77 text tokens, CFG batch 2, fp32) with TomeMGT
at rho 0, 0.25 and 0.5 (one plan per 5 blocks), interleaving the ratios, median of ``--repeats``.
Target: >= 1.2x at rho 0.25. Not collected by pytest (the name is not ``test_*``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffusers.models.transformers.transformer_flux import FluxPosEmbed, FluxTransformerBlock  # noqa: E402
from optimum.quanto import freeze  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from mgt.efficient import quantization  # noqa: E402
from mgt.efficient.quant_config import PRESETS  # noqa: E402
from mgt.efficient.quantized_checkpoint import load_quantized, save_quantized  # noqa: E402
from mgt.efficient.tome import TomeMGT  # noqa: E402
from mgt.hub import loading  # noqa: E402
from mgt.models.meissonic import MeissonicTransformer, image_rope_ids  # noqa: E402

TARGETS = {"w8a16": 0.55, "w8a8": 0.55, "w4a16": 0.32, "w4a8": 0.32, "scq": 0.32}


def random_meissonic(layers: int, single_layers: int) -> MeissonicTransformer:
    """Meissonic-1024 (hub config) in bf16 with random weights, built without an fp32 copy."""
    with torch.device("meta"):
        model = MeissonicTransformer(num_layers=layers, num_single_layers=single_layers).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02, generator=generator)
    return model.eval().requires_grad_(False)


def weight_bytes(model: MeissonicTransformer) -> tuple[dict, dict]:
    """Per-preset bytes and ratio to bf16; also returns the w8a16 and w4a8 models for the load-time part."""
    bf16 = quantization.weight_bytes(model)
    rows, kept = {"bf16": {"bytes": bf16, "ratio": 1.0}}, {}
    for preset in PRESETS:
        if preset == "scq":  # same layout as w4a8: only the calibrated values differ
            rows[preset] = dict(rows["w4a8"], target=TARGETS[preset])
            continue
        started = time.perf_counter()
        copy_ = copy.deepcopy(model)
        freeze(quantization.quantize_transformer(copy_, preset))
        size = quantization.weight_bytes(copy_)
        rows[preset] = {"bytes": size, "ratio": size / bf16, "target": TARGETS[preset],
                        "quantize_seconds": time.perf_counter() - started}
        print(f"  {preset}: {size / 2**30:.3f} GiB = {size / bf16:.3f}x bf16", flush=True)
        if preset in ("w8a16", "w4a8"):
            kept[preset] = copy_
        del copy_
    return rows, kept


def load_times(model: MeissonicTransformer, quantized: dict, repeats: int, folder: Path) -> dict:
    (folder / "bf16").mkdir(parents=True)
    (folder / "bf16" / "config.json").write_text(model.to_json_string())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "bf16" / "diffusion_pytorch_model.safetensors")
    for preset, q in quantized.items():
        save_quantized(q, str(folder / preset), preset=preset, source_model="random Meissonic-1024")
    rows = {}
    loaders = {"bf16": lambda: loading.load_component(MeissonicTransformer, folder / "bf16", torch.bfloat16,
                                                      torch.device("cpu"))}
    loaders.update({p: (lambda p=p: load_quantized(str(folder / p))) for p in quantized})
    # The bf16 safetensors are memory-mapped and read on first use, so "ready" adds one forward pass on a
    # small CFG pair (16x16 tokens), which touches every weight on both sides.
    generator = torch.Generator().manual_seed(0)
    dim = model.config.joint_attention_dim
    probe = (torch.randint(0, 8192, (2, 16, 16), generator=generator),
             torch.randn(2, 77, dim, generator=generator).bfloat16(),
             torch.randn(2, dim, generator=generator).bfloat16(),
             torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 6.0]] * 2).bfloat16(), torch.tensor([40]))
    for name, load in loaders.items():
        seconds, ready = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            loaded = load()
            seconds.append(time.perf_counter() - started)
            with torch.inference_mode():
                loaded(*probe)
            ready.append(time.perf_counter() - started)
            del loaded
        file_bytes = sum(f.stat().st_size for f in (folder / name).glob("*.safetensors"))
        rows[name] = {"seconds": min(seconds), "ready_seconds": min(ready), "file_bytes": file_bytes}
        print(f"  load {name}: {min(seconds):.2f} s, ready after one forward {min(ready):.2f} s "
              f"({file_bytes / 2**30:.3f} GiB on disk)", flush=True)
    for name in rows:
        rows[name]["vs_bf16"] = rows[name]["seconds"] / rows["bf16"]["seconds"]
        rows[name]["ready_vs_bf16"] = rows[name]["ready_seconds"] / rows["bf16"]["ready_seconds"]
    return rows


class DualStreamStack(torch.nn.Module):
    """Dual-stream blocks called like Meissonic's loop, with the two inputs TomeMGT's pre-hook reads.

    ``grid`` stands for ``token_ids`` (only its `(batch, rows, cols)` shape is used) and ``timestep``
    for the step value that seeds the window draw.
    """

    token_grid_multiple = 1

    def __init__(self, blocks: int, dim: int = 1024, heads: int = 8):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(
            FluxTransformerBlock(dim=dim, num_attention_heads=heads, attention_head_dim=dim // heads)
            for _ in range(blocks))

    def forward(self, grid, hidden, context, temb, timestep, rope):
        for block in self.transformer_blocks:
            context, hidden = block(hidden, context, temb, rope)
        return hidden


@torch.no_grad()
def tome_times(blocks: int, repeats: int, ratios=(0.0, 0.25, 0.5)) -> dict:
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # random weights can drive activations into slow denormal floats
    stack = DualStreamStack(blocks).eval()  # diffusers' default initialisation
    rows, cols, text, batch = 32, 32, 77, 2
    hidden, context, temb = torch.randn(batch, rows * cols, 1024), torch.randn(batch, text, 1024), torch.randn(batch, 1024)
    rope = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(torch.cat([torch.zeros(text, 3), image_rope_ids(rows, cols)]))
    grid, timestep = torch.zeros(batch, rows, cols), torch.tensor([40])
    seconds = {ratio: [] for ratio in ratios}
    lengths = {}
    for _ in range(repeats + 1):  # the first round warms up
        for ratio in ratios:
            tome = TomeMGT(ratio).apply(stack)
            started = time.perf_counter()
            stack(grid, hidden, context, temb, timestep, rope)
            seconds[ratio].append(time.perf_counter() - started)
            lengths[ratio] = tome.last_lengths[0]
            tome.remove()
    base = statistics.median(seconds[0.0][1:])
    out = {}
    for ratio in ratios:
        median = statistics.median(seconds[ratio][1:])
        out[str(ratio)] = {"seconds": median, "speedup": base / median, "image_tokens": lengths[ratio]}
        print(f"  rho {ratio}: {median:.2f} s for {blocks} blocks, {lengths[ratio]} image tokens, "
              f"{base / median:.2f}x", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--single-layers", type=int, default=28)
    parser.add_argument("--tome-blocks", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="memory,tome", help="memory (weight bytes + load time) and/or tome")
    parser.add_argument("--out", default="bench-results/efficiency.json")
    args = parser.parse_args()
    result = {"threads": torch.get_num_threads()}
    if "memory" in args.parts:
        memory_parts(args, result)
    if "tome" in args.parts:
        print("TomeMGT, dual-stream blocks at Meissonic-1024 widths:", flush=True)
        result["tome"] = tome_times(args.tome_blocks, args.repeats)
        for ratio, row in result["tome"].items():
            print(f"TomeMGT rho {ratio:5} {row['seconds']:7.2f} s  speedup {row['speedup']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def memory_parts(args: argparse.Namespace, result: dict) -> None:
    print("weight bytes (random Meissonic-1024 transformer, CPU):", flush=True)
    model = random_meissonic(args.layers, args.single_layers)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["weight_bytes"], quantized = weight_bytes(model)
    print("checkpoint load time:", flush=True)
    with tempfile.TemporaryDirectory(prefix="maskray-efficiency-") as folder:
        result["load"] = load_times(model, quantized, args.repeats, Path(folder))
    del model, quantized

    print(f"\n{'':8} {'GiB':>8} {'x bf16':>8} {'target':>8}")
    for name, row in result["weight_bytes"].items():
        print(f"{name:8} {row['bytes'] / 2**30:8.3f} {row['ratio']:8.3f} {row.get('target', ''):>8}")
    print(f"parameters: {result['parameters'] / 1e9:.3f} B")
    for name, row in result["load"].items():
        print(f"load {name:6} {row['seconds']:7.2f} s ({row['vs_bf16']:.2f}x bf16), ready after one forward "
              f"{row['ready_seconds']:7.2f} s ({row['ready_vs_bf16']:.2f}x bf16)")


if __name__ == "__main__":
    main()
