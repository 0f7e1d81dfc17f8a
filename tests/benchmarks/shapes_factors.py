"""Which part of a caption a shapes model's images fail: the factors of the ``shapes`` score by caption kind.

The score of an image is a product (``shapes.scorer.caption_factors``): the caption's number of objects
detected, their shapes, colours, named sizes and positions, the relation and the background. A mean score near 0
on scenes of several objects says nothing about why; this benchmark prints, per caption kind, the mean of each
factor and the share of images in which it is above 0.5 (over the images with at least as many detections as the
caption has objects; the others score 0 and are counted apart), and how many objects the detector finds
(peak cells above 0.5).
Run from the repository root, alone (it generates one image per caption and seed):

    python tests/benchmarks/shapes_factors.py --model shapes-meissonic /path/to/candidate --seeds-per-caption 2

Captions are the 300 evaluation captions (``examples/shapes_heldout.jsonl``) unless ``--tune`` (300 held-out
captions from index 40,000 on, as ``shapes_model.py --tune``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from shapes_model import add_caption_arguments, captions_and_seeds  # this folder: a script's folder is on its path

ROOT = Path(__file__).resolve().parents[2]
FACTORS = ("count", "shape", "colour", "size_position", "relation", "background")


def measure(pipe, scorer, captions: list[str], seeds: list[int], batch: int = 32) -> dict:
    """Per caption kind: images, mean score, images with too few detections, each factor's mean and share above
    0.5 over the others, and a histogram of detections above 0.5."""
    import numpy as np
    from PIL import Image

    from shapes import scenes
    from shapes.scene_detector import peak_cells
    from shapes.scorer import caption_factors

    records = []
    for start in range(0, len(captions), batch):
        part, part_seeds = captions[start:start + batch], seeds[start:start + batch]
        images = [Image.fromarray(im) for im in pipe.generate(part, part_seeds).images]
        detections = scorer.detect(images)
        found = (peak_cells(detections.objectness) & (detections.objectness > 0.5)).sum(dim=(1, 2)).tolist()
        for b, caption in enumerate(part):
            spec = scenes.parse_caption(caption)
            factors = caption_factors(spec, detections, b)
            records.append({"kind": spec.kind, "factors": None if factors is None else factors._asdict(),
                            "detected": int(found[b])})
    by_kind = {}
    for kind in sorted({r["kind"] for r in records}):
        rows = [r for r in records if r["kind"] == kind]
        factors = np.array([[r["factors"][f] for f in FACTORS] for r in rows if r["factors"]]).reshape(-1, len(FACTORS))
        by_kind[kind] = {"images": len(rows), "mean_score": float(factors.prod(axis=1).sum() / len(rows)),
                         "too_few_detections": len(rows) - len(factors),
                         "factor_mean": dict(zip(FACTORS, factors.mean(axis=0).tolist())) if len(factors) else {},
                         "factor_above_half": dict(zip(FACTORS, (factors > 0.5).mean(axis=0).tolist()))
                         if len(factors) else {},
                         "detected_histogram": np.bincount(np.minimum([r["detected"] for r in rows], 4),
                                                           minlength=5).tolist()}
    return by_kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["shapes-meissonic"], help="Registered names or model folders.")
    add_caption_arguments(parser, tune_default=300)
    parser.add_argument("--out", default="shapes_factors.json")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch

    import mgt
    from shapes.scorer import ShapesScorer

    torch.set_num_threads(args.threads)
    captions, seeds = captions_and_seeds(args.tune, args.count, args.seeds_per_caption, tune_default=300)
    scorer, results = ShapesScorer(device="cpu"), []
    print("| model | kind | images | score | too few objects | " + " | ".join(f"{f}: mean / >0.5" for f in FACTORS)
          + " | objects detected 0/1/2/3/4+ |")
    print("|---|---|---|---|---|" + "---|" * len(FACTORS) + "---|")
    for model in args.model:
        started = time.monotonic()
        by_kind = measure(mgt.load_pipeline(model, device="cpu"), scorer, captions, seeds)
        results.append({"model": model, "by_kind": by_kind, "seconds": round(time.monotonic() - started, 1)})
        for kind, row in by_kind.items():
            cells = " | ".join(f"{row['factor_mean'][f]:.3f} / {row['factor_above_half'][f]:.0%}"
                               if row["factor_mean"] else "n/a" for f in FACTORS)
            print(f"| {model} | {kind} | {row['images']} | {row['mean_score']:.3f} | "
                  f"{row['too_few_detections']} | {cells} | "
                  f"{'/'.join(map(str, row['detected_histogram']))} |", flush=True)
    Path(args.out).write_text(json.dumps({"tune": args.tune, "seeds_per_caption": args.seeds_per_caption,
                                          "results": results}, indent=2))


if __name__ == "__main__":
    main()
