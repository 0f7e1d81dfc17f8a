"""How well a shapes model draws its captions: mean shapes score by caption kind, the shape confusion matrix
of its single objects, and the specks it leaves in backgrounds.

Two uses, run from the repository root:

    # tune the defaults on held-out captions that are NOT the evaluation set (held-out index 40,000 on)
    python tests/benchmarks/shapes_model.py --model shapes-meissonic --tune --guidance 2 3 5 8 --steps 16 24
    # the targets, on the 300 evaluation captions (examples/shapes_heldout.jsonl) at the model's defaults
    python tests/benchmarks/shapes_model.py --model shapes-meissonic

It prints a table and writes every figure (confusion matrices included) to ``--out``, with every image's
caption, seed, kind, score and (single objects) the shape the scorer read, so that two models measured on the
same captions and seeds can be compared pair by pair (``tests/benchmarks/shapes_model_compare.py``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TUNE_START = 40_000  # held-out index of the tuning captions: the evaluation set is 10,000-10,299


def measure(pipe, scorer, captions: list[str], seeds: list[int], guidance: float | None, steps: int | None,
            sampler=None, batch: int = 32) -> dict:
    """Mean score overall and per kind, the single-object shape confusion (the scorer's top detection), stray
    pixels (:func:`shapes.training.probes.stray_pixels`) per image, and every image's record (``per_sample``, in
    caption order)."""
    import numpy as np
    from PIL import Image

    from shapes import scenes
    from shapes.training import probes

    scores, read, strays = [], {}, []
    for start in range(0, len(captions), batch):
        part, part_seeds = captions[start:start + batch], seeds[start:start + batch]
        images = [Image.fromarray(im) for im in pipe.generate(part, part_seeds, guidance=guidance, steps=steps,
                                                                  sampler=sampler).images]
        scores += scorer.score(images, part)
        strays += [probes.stray_pixels(im) for im in images]
        singles = [i for i, c in enumerate(part) if scenes.parse_caption(c).kind == "single"]
        for i, shape in zip(singles, probes.read_single_shapes(scorer, [images[i] for i in singles])):
            read[start + i] = shape
    kinds = [scenes.parse_caption(c).kind for c in captions]
    truth = [scenes.parse_caption(captions[i]).phrases[0].shape for i in read]
    by_kind = {k: float(np.mean([s for s, kk in zip(scores, kinds) if kk == k])) for k in sorted(set(kinds))}
    per_sample = [{"caption": c, "seed": seed, "kind": kind, "score": float(score), "read_shape": read.get(i),
                   "stray_pixels": stray}
                  for i, (c, seed, kind, score, stray) in enumerate(zip(captions, seeds, kinds, scores, strays,
                                                                         strict=True))]
    return {"mean_score": float(np.mean(scores)), "above_half": float(np.mean(np.array(scores) > 0.5)),
            "by_kind": by_kind, "single_shape_accuracy": probes.accuracy(truth, list(read.values())),
            "single_confusion": probes.confusion(truth, list(read.values())), "samples": len(captions),
            "stray_pixels_per_image": float(np.mean(strays)), "images_with_specks": float(np.mean(np.array(strays) > 0)),
            "per_sample": per_sample}


def add_caption_arguments(parser: argparse.ArgumentParser, tune_default: int = 96) -> None:
    """The options that choose the captions, seeds and threads (shared with ``shapes_factors.py``)."""
    parser.add_argument("--tune", action="store_true", help="Tuning captions (held-out index 40,000 on), not the "
                        "evaluation set.")
    parser.add_argument("--count", type=int, default=None,
                        help=f"Captions (default: {tune_default} tuning, all 300 evaluation).")
    parser.add_argument("--seeds-per-caption", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)


def captions_and_seeds(tune: bool, count: int | None, seeds_per_caption: int,
                       tune_default: int = 96) -> tuple[list[str], list[int]]:
    """The evaluation captions (``examples/shapes_heldout.jsonl``, the first ``count``) or, with ``tune``, ``count``
    tuning captions (held-out index 40,000 on), each repeated with seeds ``0 .. seeds_per_caption - 1``."""
    from shapes import scenes

    if tune:
        captions = [scenes.make_scene(s).caption
                    for s in scenes.held_out_seeds(count or tune_default, start=TUNE_START)]
    else:
        lines = (ROOT / "examples" / "shapes_heldout.jsonl").read_text().splitlines()
        captions = [json.loads(line)["prompt"] for line in lines][:count]
    captions = [c for c in captions for _ in range(seeds_per_caption)]
    return captions, [i % seeds_per_caption for i in range(len(captions))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-meissonic", help="Registered name or model folder.")
    add_caption_arguments(parser)
    parser.add_argument("--guidance", type=float, nargs="+", default=[None])
    parser.add_argument("--steps", type=int, nargs="+", default=[None])
    parser.add_argument("--sampler", nargs="+", default=["vanilla"], help="Sampler specs (maskray sample "
                        "--sampler syntax), e.g. 'vanilla:gumbel_temperature=[1,0]'.")
    parser.add_argument("--out", default="shapes_model.json")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch

    import mgt
    from shapes.scorer import ShapesScorer

    torch.set_num_threads(args.threads)
    captions, seeds = captions_and_seeds(args.tune, args.count, args.seeds_per_caption)
    pipe = mgt.load_pipeline(args.model, device="cpu")
    scorer = ShapesScorer(device="cpu")
    rows = []
    for guidance, steps, spec in itertools.product(args.guidance, args.steps, args.sampler):
        started = time.monotonic()
        row = {"guidance": guidance or pipe.defaults.guidance, "steps": steps or pipe.defaults.steps, "sampler": spec,
               **measure(pipe, scorer, captions, seeds, guidance, steps, mgt.SamplerConfig.from_spec(spec)),
               "seconds": 0.0}
        row["seconds"] = round(time.monotonic() - started, 1)
        rows.append(row)
        kinds = " ".join(f"{k} {v:.3f}" for k, v in row["by_kind"].items())
        print(f"CFG {row['guidance']:>4} steps {row['steps']:>3} {spec}: mean {row['mean_score']:.3f} "
              f"(>0.5: {row['above_half']:.0%}) single-object shape accuracy {row['single_shape_accuracy']:.0%} | "
              f"{kinds} | stray px/image {row['stray_pixels_per_image']:.2f} "
              f"(images with specks {row['images_with_specks']:.0%}) | {row['seconds']:.0f} s", flush=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "tune": args.tune, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
