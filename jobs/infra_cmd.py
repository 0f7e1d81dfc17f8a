"""``maskray infra render``: write the KubeRay manifests (RayCluster, RayJobs, RayService) from one spec.

    maskray infra render --config infra/cluster.yaml --out infra/manifests
    maskray infra render --image registry/maskray:0.1.0-cu128 --max-workers 16 --out my-manifests
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.cli_args import add_model_arguments, build_model, load_config_file
from jobs.cluster import ClusterSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["render"], help="What to do (render the manifests).")
    parser.add_argument("--config", default="infra/cluster.yaml", help="Cluster spec YAML (flags override it).")
    parser.add_argument("--out", default="infra/manifests", help="Folder for the manifests; '-' prints them.")
    parser.add_argument("--root", default=".", help="Repository root (serve_config is read relative to it).")
    add_model_arguments(parser, ClusterSpec, "cluster", skip=("generate_args", "evaluate_args"))


def run(args: argparse.Namespace) -> int:
    from jobs.cluster import render_all, to_yaml

    spec = build_model(ClusterSpec, load_config_file(args.config), args, source="cluster spec")
    manifests = render_all(spec, Path(args.root))
    if args.out == "-":
        print("---\n".join(to_yaml(m) for m in manifests.values()))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, manifest in manifests.items():
        (out / name).write_text(to_yaml(manifest))
    print(f"wrote {', '.join(manifests)} to {out}/")
    return 0
