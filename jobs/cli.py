"""The ``maskray`` command: a table of subcommands, each in its own module, imported only when chosen.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``; its one-line help lives in
``COMMANDS``. Heavy imports (torch, Ray) live inside ``run`` so ``maskray --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Keep the help here so `maskray --help` imports nothing else.
COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("jobs.sample_cmd", "Generate images for a few prompts in this process (no Ray)."),
    "train-shapes": ("jobs.train_cmd", "Train the shapes-meissonic model or the shapes scorer on procedural scenes."),
    "serve": ("jobs.serve_cmd", "Serve the model over HTTP (OpenAI Images API) with Ray Serve."),
    "generate": ("jobs.generate_cmd", "Generate a scored image dataset from Parquet prompt shards on Ray Data (resumable)."),
    "evaluate": ("jobs.evaluate_cmd", "Win rates of candidate samplers against a baseline (same prompt and seed) on Ray."),
    "infra": ("jobs.infra_cmd", "Render KubeRay manifests (RayCluster, RayJobs, RayService) from infra/cluster.yaml."),
    "submit": ("jobs.submit_cmd", "Submit `generate` or `evaluate` to a Ray cluster (Ray Jobs API) and stream its logs."),
    "quantize": ("jobs.quantize_cmd", "Quantize a model's transformer (w8a16, w4a16, w8a8, w4a8, scq) and write a checkpoint."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskray",
        description="Masked generative transformers (Meissonic, aMUSEd) with the samplers of arXiv 2411.10781, "
        "on Ray.",
        epilog="Run `maskray COMMAND --help` for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # prints help or the "invalid choice" error and exits
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"maskray {name}", description=help_text,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as error:  # user errors: one line, no traceback
        print(f"maskray {name}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
