"""``maskray quantize``: quantize a model's transformer with a preset and write a checkpoint (arXiv 2411.10781 §4).

    maskray quantize --model MeissonFlow/Meissonic --dtype bf16 --preset scq --prompts prompts.parquet \\
        --out s3://bucket/meissonic-scq

The A8 presets calibrate on the full-precision model's own generations of the prompts (any prompt file
that ``maskray evaluate`` reads: Parquet, JSON, JSONL, CSV or text, a folder or a glob; local or URI). The
checkpoint is then used with ``maskray sample --model M --quant PATH``.
"""

from __future__ import annotations

import argparse

from jobs.cli_args import add_model_arguments, build_model, load_config_file
from mgt.config import ModelConfig
from mgt.efficient.quant_config import PRESETS, SCQConfig
from pipeline.prompt_sets import FORMATS, read_prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("quantization")
    io.add_argument("--preset", required=True, choices=list(PRESETS), help="w8a16/w4a16: int8/int4 weights; w8a8/w4a8: "
                    "plus int8 activations with per-CFG-half scales, calibrated; scq: w4a8 + QAT fine-tune + "
                    "secondary calibration.")
    io.add_argument("--prompts", help=f"Calibration prompts: a file ({FORMATS}; text: one prompt per line), a "
                    "folder of them or a glob; local path or URI. Default: a built-in set of 16 prompts.")
    io.add_argument("--out", required=True, help="Checkpoint folder: local path or object-store URI (s3://, gs://).")
    io.add_argument("--config", help="YAML file with any of the options below (flags override it).")
    add_model_arguments(parser, ModelConfig, "model", skip=("quant", "tome", "tome_reuse", "compile"))
    add_model_arguments(parser, SCQConfig, "calibration")


def run(args: argparse.Namespace) -> int:
    file_values = load_config_file(args.config)
    model_config = build_model(ModelConfig, file_values, args)
    settings = build_model(SCQConfig, file_values, args)
    prompts = read_prompts(args.prompts) if args.prompts else None

    from tqdm import tqdm

    import mgt
    from mgt.efficient.quantized_checkpoint import save_quantized
    from mgt.efficient.scq import DEFAULT_CALIBRATION_PROMPTS, quantize_pipeline

    pipe = mgt.load_pipeline(model_config.model, dtype=model_config.dtype, device=model_config.device,
                             variant=model_config.variant)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage, unit="batch"))
        bar.update(done - bar.n)

    if prompts is None:
        print(f"calibrating on the {len(DEFAULT_CALIBRATION_PROMPTS)} built-in prompts (pass --prompts FILE for yours)")
    report = quantize_pipeline(pipe, args.preset, prompts, settings, progress)
    for bar in bars.values():
        bar.close()
    save_quantized(pipe.transformer, args.out, preset=args.preset, source_model=model_config.model,
                   settings=settings.model_dump(mode="json"))
    print(f"wrote {args.preset} checkpoint to {args.out} ({report.calibration_batches} calibration batches, "
          f"{report.qat_steps} QAT steps); use it with --model {model_config.model} --quant {args.out}")
    return 0
