"""Write ``examples/shapes_heldout.jsonl``: held-out captions of the shapes benchmark with a category each.

The scenes of these seeds are never used in training (``shapes.scenes.held_out_seeds``); the category is the
caption's kind (single object, pair, triple, count, relation), so the evaluation report breaks win rates
down the GenEval way.

    python examples/make_shapes_prompts.py --count 300
"""

import argparse
import json
from pathlib import Path

from shapes.scenes import held_out_seeds, make_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="Number of captions.")
    parser.add_argument("--start", type=int, default=10_000, help="Offset into the held-out seeds.")
    parser.add_argument("--out", default=str(Path(__file__).with_name("shapes_heldout.jsonl")))
    args = parser.parse_args()
    with open(args.out, "w") as f:
        for seed in held_out_seeds(args.count, args.start):
            scene = make_scene(seed)
            f.write(json.dumps({"prompt": scene.caption, "category": scene.spec.kind}) + "\n")
    print(f"wrote {args.count} captions to {args.out}")


if __name__ == "__main__":
    main()
