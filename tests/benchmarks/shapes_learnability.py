"""What the shapes generator can learn when layout is taken away: one large object at the centre of the image.

Every training scene is "a large {colour} {shape} in the center" on a random background, the object centred at
(32, 32) with radius 11, or, with ``--jitter J``, moved up to J px and its radius up to J/3 px, as the benchmark's
own scenes are (``shapes/scenes.py``: +-3 px, +-1 px); ``--exact-share S`` draws the first ``round(16 S)`` scenes
of each batch without jitter, to measure whether exact scenes mixed in still teach shape. Everything else is the
shipped recipe (the shipped VQ, a freshly pre-trained frozen text encoder, object holes, high mask ratios) and the
shipped transformer size, so the run separates the architecture and objective from the layout entropy of the
full scene family. Every ``--eval-every`` steps it generates 60 held-out captions of the same family (CFG 1 and 3,
seeds 0-59) and reports the single-object shape accuracy and mean ``shapes`` score. docs/shapes-training.md
records what it measured.

Run from the repository root (about 7 minutes per 1000 steps at two threads, evaluation included)::

    python tests/benchmarks/shapes_learnability.py --steps 3000 --jitter 0 --out learn.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EVAL_SCENES = 60


def centred_scene(seed: int, jitter: float):
    """The one-object scene of ``seed``: a large object at the centre, moved up to ``jitter`` px."""
    from shapes import scenes

    rng = random.Random(seed)
    shape, colour = rng.choice(scenes.SHAPES), rng.choice(list(scenes.COLOURS))
    background = rng.choice(list(scenes.BACKGROUNDS))
    obj = scenes.SceneObject(shape, colour, "large", 32 + rng.uniform(-jitter, jitter),
                             32 + rng.uniform(-jitter, jitter), scenes.SIZES["large"] + rng.uniform(-jitter, jitter) / 3)
    spec = scenes.CaptionSpec((scenes.ObjectPhrase(shape, colour, "large", "center"),))
    return scenes.Scene(seed, background, (obj,), scenes.write_caption(spec, random.Random(0)), spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--jitter", type=float, default=0.0, help="Centre jitter in px (radius: a third of it).")
    parser.add_argument("--exact-share", type=float, default=0.0,
                        help="Share of each batch drawn without jitter (the first scenes of the batch).")
    parser.add_argument("--silhouette", type=float, default=0.0, help="Weight of the auxiliary silhouette target.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="shapes_learnability.json")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch
    from diffusers import VQModel
    from PIL import Image

    import mgt
    from mgt.models.tiny import write_tokenizer
    from shapes import scenes
    from shapes.scorer import ShapesScorer
    from shapes.training import probes
    from shapes.training.config import TrainShapesConfig
    from shapes.training.data import render_tensors
    from shapes.training.generator import Recipe, train_generator
    from shapes.training.shapes import write_generator

    torch.set_num_threads(args.threads)
    vq = VQModel.from_pretrained(ROOT / "shapes" / "assets" / "shapes-meissonic" / "vqvae").eval().requires_grad_(False)
    work = Path(tempfile.mkdtemp(prefix="learnability-"))
    tokenizer = write_tokenizer(work / "tokenizer", scenes.vocabulary())
    config = TrainShapesConfig(seed=0, steps=args.steps, silhouette=args.silhouette)
    scorer = ShapesScorer(device="cpu")
    held_out = [centred_scene(s, args.jitter) for s in scenes.held_out_seeds(EVAL_SCENES)]
    captions, truth = [s.caption for s in held_out], [s.objects[0].shape for s in held_out]
    losses: list[float] = []
    rows: list[dict] = []
    started = time.monotonic()

    def scene_batch(seeds: list[int]):
        exact = round(args.exact_share * len(seeds))
        batch = [centred_scene(s, 0.0 if i < exact else args.jitter) for i, s in enumerate(seeds)]
        return render_tensors(batch), batch

    def evaluate(done: int, transformer, text_encoder) -> None:
        if done % args.eval_every and done != args.steps:
            return
        row = {"steps": done, "loss": float(np.mean(losses[-500:])), "seconds": round(time.monotonic() - started)}
        transformer.eval()
        write_generator(work / "model", transformer, text_encoder, vq, config)
        pipe = mgt.load_pipeline(str(work / "model"), device="cpu")
        for guidance in (1.0, 3.0):
            images = [Image.fromarray(im) for im in
                      pipe.generate(captions, list(range(EVAL_SCENES)), guidance=guidance).images]
            row[f"accuracy_cfg{guidance:g}"] = probes.accuracy(truth, probes.read_single_shapes(scorer, images))
            row[f"score_cfg{guidance:g}"] = float(np.mean(scorer.score(images, captions)))
        transformer.train()
        rows.append(row)
        print(f"{done:>6} steps  loss {row['loss']:.3f}  CFG 1: accuracy {row['accuracy_cfg1']:.0%} score "
              f"{row['score_cfg1']:.3f}  CFG 3: accuracy {row['accuracy_cfg3']:.0%} score {row['score_cfg3']:.3f}  "
              f"{row['seconds']} s", flush=True)
        Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))

    train_generator(vq, tokenizer, config.seed, args.steps, config.sample_steps, config.batch_size, config.lr,
                    config.cond_dropout, config.text_steps,
                    recipe=Recipe(config.text_lr_scale, config.hole_share, config.high_mask_share,
                                  silhouette=args.silhouette),
                    on_step=lambda step, loss: losses.append(loss), on_models=evaluate, scene_batch=scene_batch)


if __name__ == "__main__":
    main()
