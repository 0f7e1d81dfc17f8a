"""``maskray report OUT``: write the report of a finished ``maskray generate`` run under ``OUT/report/``.

    maskray report out

Score histogram, captioned contact sheets of the best and worst images, per-category means and a static
``report.html`` (``jobs.run_report``). ``maskray generate`` writes it at the end of a run unless ``--no-report``;
this command writes it again, e.g. for a run made before the report existed. No Ray.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="The --out of a finished maskray generate run (local folder or s3:// / gs://).")
    parser.add_argument("--storage-options", default="{}", help="fsspec options for an object-store OUT, as JSON, "
                        "e.g. '{\"client_kwargs\": {\"endpoint_url\": \"http://127.0.0.1:9000\"}}'.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random sample of images the page shows.")


def run(args: argparse.Namespace) -> int:
    from jobs.run_report import write_run_report

    summary = write_run_report(args.out, json.loads(args.storage_options), args.seed)
    mean = summary["mean_kept_score"]
    print(f"maskray report: {args.out.rstrip('/')}/report/ (report.html, top.png, bottom.png, scores.png): "
          f"{summary['kept_images']} kept images of {summary['rows']} rows"
          + ("" if mean is None else f", mean kept score {mean:.4f}"))
    return 0
