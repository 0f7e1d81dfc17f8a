"""``maskray train-shapes``: train the ``shapes-meissonic`` model or the ``shapes`` scorer on procedural scenes.

``--part model`` trains the VQ tokenizer, then the Meissonic transformer with its CLIP text encoder, and
writes the hub layout to ``--out`` (loadable with ``--model FOLDER``); ``--part scorer`` trains the scene
detector of the ``shapes`` scorer. The defaults reproduce the model that ships in ``shapes/assets/``; the
shipped scorer was trained with ``--threads 1`` (each folder's ``training.json`` holds its settings).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jobs.cli_args import add_model_arguments, build_model, load_config_file

HELP = "Train the shapes-meissonic model or the shapes scorer on procedural scenes."  # `maskray --help` reads it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from shapes.training.config import TrainShapesConfig

    io = parser.add_argument_group("what and where")
    io.add_argument("--part", choices=["model", "scorer"], default="model",
                    help="model: VQ + transformer + text encoder in the hub layout; scorer: the shapes scorer's detector.")
    io.add_argument("--out", required=True, help="Output folder (created; a model run resumes after a finished VQ).")
    io.add_argument("--config", help="YAML file with any of the options below (flags override it).")
    add_model_arguments(parser, TrainShapesConfig, "training")


def run(args: argparse.Namespace) -> int:
    from shapes.training.config import TrainShapesConfig

    config = build_model(TrainShapesConfig, load_config_file(args.config), args)

    import torch
    from tqdm import tqdm

    from shapes.training.shapes import train_model, train_scorer

    torch.set_num_threads(config.threads)
    out = Path(args.out)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, step: int, total: int, loss: float) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=stage, unit="step")
        bars[stage].update(1)
        bars[stage].set_postfix(loss=f"{loss:.4f}", refresh=False)

    started = time.monotonic()
    if args.part == "model":
        report = train_model(config, out, progress)
        print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    else:
        from shapes.scorer import ShapesScorer, held_out_accuracy

        train_scorer(config, out, progress)
        accuracy = held_out_accuracy(ShapesScorer(checkpoint=str(out)))
        (out / "accuracy.json").write_text(json.dumps(accuracy, indent=2))
        print(json.dumps(accuracy, indent=2))
    for bar in bars.values():
        bar.close()
    print(f"wrote {out}/ in {time.monotonic() - started:.0f} s")
    return 0
