"""Does a shapes model draw the caption's other object beside one already drawn?

Once the sampler has committed one object of a two-object caption, the rest of the image must hold the other
one: the other colour and shape, not a copy of the first and not background. This benchmark sets up that state
directly. On held-out two-object scenes whose colours differ (held-out index 30,000 on, never the evaluation
or tuning captions), laid out on the training anchors by default (``place_on_anchors``), it masks the box
around one object (``--hide one``; ``both`` masks both boxes), leaves the rest of the rendered scene visible,
lets the model redraw the masked pixels from the caption (seed = scene seed) and reads, with the ``shapes``
scorer's detector, the most confident object near the hidden one: its colour (the hidden object's, the visible
one's or another), its shape, or no object. Run from the repository root:

    python tests/benchmarks/shapes_complement.py --model shapes-meissonic other-model-folder --hide one both

It prints a table and writes the figures to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START = 30_000  # held-out index of the first scene looked at
PRESENT = 0.5  # a detection with objectness above this counts as an object
NEAR = 4.0  # pixels beyond the hidden object's radius within which a detection counts as drawn there


def two_colour_scenes(count: int, anchored: bool) -> list:
    """The first ``count`` held-out two-object scenes from index :data:`START` whose colours differ."""
    from shapes import scenes
    from shapes.training.data import place_on_anchors

    found, index = [], START
    while len(found) < count:
        scene = scenes.make_scene(scenes.held_out_seeds(1, start=index)[0])
        index += 1
        if len(scene.objects) == 2 and scene.objects[0].colour != scene.objects[1].colour:
            found.append(place_on_anchors(scene) if anchored else scene)
    return found


def measure(pipe, scorer, batch: list, hide: str, chunk: int = 32) -> dict:
    """Shares of scenes whose hidden object is redrawn in its own colour, in the visible object's colour, in
    another colour or not at all, and with its own shape (and with both)."""
    import numpy as np
    from PIL import Image

    from mgt.editing import Edit
    from shapes import scenes
    from shapes.scene_detector import peak_cells
    from shapes.training.probes import hole_mask

    names, tally = list(scenes.COLOURS), dict.fromkeys(
        ["own_colour", "visible_colour", "other_colour", "nothing", "own_shape", "own_shape_and_colour"], 0)
    for start in range(0, len(batch), chunk):
        part = batch[start:start + chunk]
        hidden = [s.objects[s.seed % 2] for s in part]  # which of the two, fixed by the scene
        edits = []
        for scene, obj in zip(part, hidden):
            masked = replace(scene, objects=scene.objects if hide == "both" else (obj,))
            mask = hole_mask(masked, scenes.SIZE).numpy().astype(np.uint8) * 255
            edits.append(Edit(scenes.render(scene), Image.fromarray(mask)))
        images = pipe.generate([s.caption for s in part], [s.seed for s in part], edits=edits).images
        det = scorer.detect([Image.fromarray(im) for im in images])
        for b, (scene, obj) in enumerate(zip(part, hidden)):
            visible = scene.objects[1 - scene.seed % 2]
            peaks = peak_cells(det.objectness[b:b + 1])[0]
            near = [(int(r), int(c)) for r, c in peaks.nonzero().tolist() if det.objectness[b, r, c] > PRESENT
                    and np.hypot(*(det.centres[b, r, c].numpy() - [obj.x, obj.y])) < obj.radius + NEAR]
            if not near:
                tally["nothing"] += 1
                continue
            r, c = max(near, key=lambda cell: float(det.objectness[b, cell[0], cell[1]]))
            colour = names[int(det.colour[b, r, c].argmax())]
            shape = scenes.SHAPES[int(det.shape[b, r, c].argmax())]
            tally["own_colour" if colour == obj.colour else
                  "visible_colour" if colour == visible.colour else "other_colour"] += 1
            tally["own_shape"] += shape == obj.shape
            tally["own_shape_and_colour"] += shape == obj.shape and colour == obj.colour
    return {"scenes": len(batch), **{k: v / len(batch) for k, v in tally.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["shapes-meissonic"], help="Registered names or model folders.")
    parser.add_argument("--hide", nargs="+", choices=["one", "both"], default=["one"],
                        help="Mask the box around one object (the other stays visible) or around both.")
    parser.add_argument("--count", type=int, default=120, help="Scenes.")
    parser.add_argument("--as-drawn", action="store_true",
                        help="Keep the scenes' own layouts instead of moving their objects onto the anchors.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="shapes_complement.json")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch

    import mgt
    from shapes.scorer import ShapesScorer

    torch.set_num_threads(args.threads)
    batch, scorer, rows = two_colour_scenes(args.count, anchored=not args.as_drawn), ShapesScorer(device="cpu"), []
    print("| model | hidden | scenes | own colour | visible object's colour | other colour | nothing | own shape "
          "| own shape and colour | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.model:
        pipe = mgt.load_pipeline(model, device="cpu")
        for hide in args.hide:
            started = time.monotonic()
            row = {"model": model, "hide": hide, **measure(pipe, scorer, batch, hide)}
            row["seconds"] = round(time.monotonic() - started, 1)
            rows.append(row)
            print(f"| {model} | {hide} | {row['scenes']} | {row['own_colour']:.0%} | {row['visible_colour']:.0%} | "
                  f"{row['other_colour']:.0%} | {row['nothing']:.0%} | {row['own_shape']:.0%} | "
                  f"{row['own_shape_and_colour']:.0%} | {row['seconds']:.0f} |", flush=True)
    Path(args.out).write_text(json.dumps({"anchored": not args.as_drawn, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
