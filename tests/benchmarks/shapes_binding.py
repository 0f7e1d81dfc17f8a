"""Colour binding of a shapes model on two-object captions: does it draw two objects, and both colours?

The shapes score of a pair or relation caption multiplies the count, each object's shape and colour and the
relation, so it stays near 0 while any factor fails. This benchmark isolates the first two: on the evaluation
captions of kind pair or relation whose two colours differ (129 of the 300 in
``examples/shapes_heldout.jsonl``), it generates one image per caption (seed = the caption's index in that
list) and counts, with the ``shapes`` scorer's detector, the images with two or more objects (detections above
0.5), those showing both colours named, and those showing only one of them. Run from the repository root:

    python tests/benchmarks/shapes_binding.py --model shapes-meissonic other-model-folder

It prints a table and writes the figures to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRESENT = 0.5  # a detection with objectness above this counts as an object


def two_colour_captions() -> list[tuple[str, set[str]]]:
    """The evaluation captions of two objects in different colours, with those colours."""
    from shapes import scenes

    found = []
    for line in (ROOT / "examples" / "shapes_heldout.jsonl").read_text().splitlines():
        caption = json.loads(line)["prompt"]
        spec = scenes.parse_caption(caption)
        colours = {phrase.colour for phrase in spec.phrases}
        if spec.kind in ("pair", "relation") and len(colours) == 2:
            found.append((caption, colours))
    return found


def measure(pipe, scorer, captions: list[tuple[str, set[str]]], guidance: float | None, batch: int = 32) -> dict:
    """Shares of images with two or more objects, with both colours, and with one of the two colours only."""
    from PIL import Image

    from shapes import scenes
    from shapes.scene_detector import peak_cells

    names = list(scenes.COLOURS)
    two = both = one = 0
    for start in range(0, len(captions), batch):
        part = captions[start:start + batch]
        images = pipe.generate([c for c, _ in part], list(range(start, start + len(part))), guidance=guidance).images
        det = scorer.detect([Image.fromarray(im) for im in images])
        for b, (_, colours) in enumerate(part):
            peaks = peak_cells(det.objectness[b:b + 1])[0]
            cells = [(int(r), int(c)) for r, c in peaks.nonzero().tolist() if det.objectness[b, r, c] > PRESENT]
            drawn = {names[int(det.colour[b, r, c].argmax())] for r, c in cells}
            two += len(cells) >= 2
            both += colours <= drawn
            one += len(colours & drawn) == 1
    n = len(captions)
    return {"captions": n, "two_or_more_objects": two / n, "both_colours": both / n, "one_colour_only": one / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["shapes-meissonic"], help="Registered names or model folders.")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: each model's own).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="shapes_binding.json")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch

    import mgt
    from shapes.scorer import ShapesScorer

    torch.set_num_threads(args.threads)
    captions, scorer, rows = two_colour_captions(), ShapesScorer(device="cpu"), []
    print("| model | captions | two or more objects | both colours | one colour only | seconds |")
    print("|---|---|---|---|---|---|")
    for model in args.model:
        started = time.monotonic()
        row = {"model": model, **measure(mgt.load_pipeline(model, device="cpu"), scorer, captions, args.guidance)}
        row["seconds"] = round(time.monotonic() - started, 1)
        rows.append(row)
        print(f"| {model} | {row['captions']} | {row['two_or_more_objects']:.0%} | {row['both_colours']:.0%} | "
              f"{row['one_colour_only']:.0%} | {row['seconds']:.0f} |", flush=True)
    Path(args.out).write_text(json.dumps({"guidance": args.guidance, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
