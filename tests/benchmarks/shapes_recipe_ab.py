"""A/B of shapes-generator training recipes: learning curves of the shape word, arm against arm.

Each arm trains the generator from the same start (the shipped VQ, the same seed, so the same transformer
initialisation and the same freshly pre-trained text encoder) for ``--steps`` steps with its own recipe,
and at every ``--eval-every`` steps measures on held-out single-object scenes (:mod:`shapes.training.probes`):

- ``gap_all`` / ``gap_hole``: shape-swapped minus true caption cross-entropy on shape-specific tokens, with
  every token masked / with only a box around the object masked;
- ``inpaint``: shape accuracy when the sampler redraws that box from the caption;
- ``generate``: shape accuracy of free generations of one-object captions (confusion matrix in the JSON);
- ``probe``: linear-probe shape accuracy of the text encoder's pooled embedding.

The arms run side by side in their own processes (``--threads`` each), so load on this shared machine hits
both alike. Run from the repository root::

    python tests/benchmarks/shapes_recipe_ab.py --steps 1000 --eval-every 250 --out ab.json

It prints a table per evaluation point and writes every figure to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARMS = {  # name -> Recipe fields: (text_lr_scale, hole_share, high_mask_share[, lattice[, anchors[, silhouette[, lessons]]]])
    "today": (1.0, 0.0, 0.0),
    "frozen": (0.0, 0.0, 0.0),
    "frozen+holes": (0.0, 0.5, 0.0),
    "new": (0.0, 0.5, 0.25),
    "new+lattice": (0.0, 0.5, 0.25, 4),
    "new+anchors": (0.0, 0.5, 0.25, 0, True),
    "new+silhouette": (0.0, 0.5, 0.25, 0, False, 1.0),
    "new+lessons": (0.0, 0.5, 0.25, 0, False, 0.0, 0.5),
}
PROBE_SCENES = 48  # single-object scenes for the cross-entropy gaps
SAMPLE_SCENES = 30  # single-object scenes for inpainting and generation
SCENES_START = 30_000  # held-out index: far from the evaluation set (10,000-10,299) and the tests' scenes


def run_arm(name: str, recipe: tuple, steps: int, eval_every: int, threads: int,
            seed: int, results: str) -> None:
    """Train one arm and append one JSON line per evaluation point to ``results``."""
    sys.path.insert(0, str(ROOT))
    import torch
    from diffusers import VQModel

    import mgt
    from mgt.models.tiny import write_tokenizer
    from shapes import scenes
    from shapes.scorer import ShapesScorer
    from shapes.training import probes
    from shapes.training.config import TrainShapesConfig
    from shapes.training.generator import Recipe, encode_text, train_generator
    from shapes.training.shapes import write_generator

    torch.set_num_threads(threads)
    vq = VQModel.from_pretrained(ROOT / "shapes" / "assets" / "shapes-meissonic" / "vqvae").eval().requires_grad_(False)
    work = Path(tempfile.mkdtemp(prefix=f"ab-{name.replace('+', '-')}-"))
    tokenizer = write_tokenizer(work / "tokenizer", scenes.vocabulary())
    config = TrainShapesConfig(seed=seed, steps=steps)
    scorer = ShapesScorer(device="cpu")
    probe_scenes = probes.single_object_scenes(PROBE_SCENES, start=SCENES_START)
    sample_scenes = probes.single_object_scenes(SAMPLE_SCENES, start=SCENES_START + 2000)
    truth = [s.objects[0].shape for s in sample_scenes]
    started = time.monotonic()
    logged: list[dict] = []

    def evaluate(done: int, transformer, text_encoder) -> None:
        if done % eval_every and done != steps:
            return
        training_seconds = time.monotonic() - started - sum(r["eval_seconds"] for r in logged)
        eval_started = time.monotonic()
        modes = transformer.training, text_encoder.training
        transformer.eval()
        text_encoder.eval()
        encode = lambda captions: encode_text(tokenizer, text_encoder, captions)  # noqa: E731
        with torch.no_grad():
            row = {"arm": name, "steps": done,
                   "gap_all": probes.shape_swap_gap(transformer, encode, vq, probe_scenes, config.sample_steps),
                   "gap_hole": probes.shape_swap_gap(transformer, encode, vq, probe_scenes, config.sample_steps,
                                                     hole=True),
                   "probe": probes.encoder_shape_probe(encode)}
            folder = work / f"model-{done}"
            write_generator(folder, transformer, text_encoder, vq, config)
            pipe = mgt.load_pipeline(str(folder), device="cpu")
            inpainted = probes.inpaint_shapes(pipe, scorer, sample_scenes)
            generated = probes.generated_shapes(pipe, scorer, sample_scenes)
        row.update(inpaint=probes.accuracy(truth, inpainted), generate=probes.accuracy(truth, generated),
                   inpaint_confusion=probes.confusion(truth, inpainted),
                   generate_confusion=probes.confusion(truth, generated),
                   training_seconds=round(training_seconds, 1),
                   eval_seconds=round(time.monotonic() - eval_started, 1))
        logged.append(row)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        transformer.train(modes[0])
        text_encoder.train(modes[1])

    train_generator(vq, tokenizer, seed, steps, config.sample_steps, config.batch_size, config.lr,
                    config.cond_dropout, config.text_steps, recipe=Recipe(*recipe), on_models=evaluate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=["today", "new"], choices=list(ARMS))
    parser.add_argument("--steps", type=int, default=1000, help="Training steps per arm.")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per arm (arms run in parallel).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="shapes_recipe_ab.json")
    args = parser.parse_args()

    lines = Path(args.out).with_suffix(".jsonl")
    lines.unlink(missing_ok=True)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=run_arm, args=(arm, ARMS[arm], args.steps, args.eval_every, args.threads,
                                                     args.seed, str(lines))) for arm in args.arms]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    rows = [json.loads(line) for line in lines.read_text().splitlines()]
    rows.sort(key=lambda r: (r["steps"], args.arms.index(r["arm"])))
    print(f"{'steps':>6} {'arm':>13} {'gap_all':>8} {'gap_hole':>8} {'inpaint':>8} {'generate':>8} {'probe':>6} "
          f"{'train s':>8}")
    for r in rows:
        print(f"{r['steps']:>6} {r['arm']:>13} {r['gap_all']['gap']:>8.3f} {r['gap_hole']['gap']:>8.3f} "
              f"{r['inpaint']:>8.2f} {r['generate']:>8.2f} {r['probe']:>6.2f} {r['training_seconds']:>8.0f}")
    Path(args.out).write_text(json.dumps({"arms": {a: ARMS[a] for a in args.arms}, "settings": vars(args),
                                          "rows": rows}, indent=2))
    if any(worker.exitcode for worker in workers):
        sys.exit("an arm failed; see its traceback above")


if __name__ == "__main__":
    main()
