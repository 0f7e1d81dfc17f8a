"""The ``maskray`` command: a table of subcommands, each in its own module, imported only when chosen.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``; heavy imports (torch,
Ray) live inside ``run`` so ``maskray --help`` stays instant. Other packages add subcommands through the
``maskray.commands`` entry-point group (name = a module); such a module also defines ``HELP`` (one line),
which ``maskray --help`` imports it to read.
"""

from __future__ import annotations

import argparse
import sys

from mgt.hub.registry import PluginError, Registry

# name -> (module, one-line help). Keep the help here so `maskray --help` imports nothing else.
COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("jobs.sample_cmd", "Generate images for a few prompts in this process (no Ray)."),
    "serve": ("jobs.serve_cmd", "Serve the model over HTTP (OpenAI Images API) with Ray Serve."),
    "generate": ("jobs.generate_cmd", "Generate a scored image dataset from Parquet prompt shards on Ray Data (resumable)."),
    "report": ("jobs.report_cmd", "Write the report of a generate run (histogram, contact sheets, report.html)."),
    "evaluate": ("jobs.evaluate_cmd", "Win rates of candidate samplers against a baseline (same prompt and seed) on Ray."),
    "infra": ("jobs.infra_cmd", "Render KubeRay manifests (RayCluster, RayJobs, RayService) from infra/cluster.yaml."),
    "submit": ("jobs.submit_cmd", "Submit `generate` or `evaluate` to a Ray cluster (Ray Jobs API) and stream its logs."),
    "quantize": ("jobs.quantize_cmd", "Quantize a model's transformer (w8a16, w4a16, w8a8, w4a8, scq) and write a checkpoint."),
}
# The built-in commands plus the plugins' (their modules are imported when chosen or when listed by --help).
COMMAND_MODULES = Registry("command", "maskray.commands", {name: module for name, (module, _) in COMMANDS.items()})


def command_help(name: str) -> str:
    """The one-line help of command ``name``: from the table, or the ``HELP`` of a plugin's module."""
    if name in COMMANDS:
        return COMMANDS[name][1]
    module = COMMAND_MODULES.get(name)
    if not isinstance(getattr(module, "HELP", None), str):
        raise PluginError(f"plugin command {name!r} ({module.__name__}) defines no HELP string, the one-line help "
                          "`maskray --help` shows; add it to the module")
    return module.HELP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskray",
        description="Masked generative transformers (Meissonic, aMUSEd) with the samplers of arXiv 2411.10781, "
        "on Ray.",
        epilog="Run `maskray COMMAND --help` for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    plugins = [name for name in COMMAND_MODULES.names() if name not in COMMANDS]
    for name in [*COMMANDS, *plugins]:
        sub.add_parser(name, help=command_help(name), description=command_help(name), add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMAND_MODULES:
        build_parser().parse_args(argv)  # prints help or the "invalid choice" error and exits
        return 2
    name, rest = argv[0], argv[1:]
    module = COMMAND_MODULES.get(name)
    parser = argparse.ArgumentParser(prog=f"maskray {name}", description=command_help(name),
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
