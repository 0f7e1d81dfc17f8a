"""Two shapes models measured on the same captions and seeds, compared image by image with 95 % intervals.

One image per caption and seed is a coarse measurement: the evaluation set has 31 count captions and 28
triples, so a figure can move by a tenth between two seeds of one model. Before calling one model ahead of
another, pair their images by (caption, seed) and ask whether the difference's bootstrap interval excludes
zero. Each figure is paired the same way: the mean shapes score, the share above 0.5, the mean per caption
kind, and the single-object shape accuracy (the scorer's reading equals the caption's shape). Run from the
repository root on two outputs of ``tests/benchmarks/shapes_model.py`` (same captions, same
``--seeds-per-caption``):

    python tests/benchmarks/shapes_model_compare.py candidate.json baseline.json
    # pool two measurement sets (say the evaluation captions and the tuning captions), each paired on its own
    python tests/benchmarks/shapes_model_compare.py eval_cand.json eval_base.json --and tune_cand.json tune_base.json

A figure is "ahead" or "behind" when its 95 % interval of the paired difference excludes zero by at least
half the table's resolution (0.001; triples score about 1e-8, and a difference of that size is level), "level"
otherwise; differences below that resolution count as ties in the wins and losses. It prints a table and
writes the figures to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
RESOLUTION = 1e-3  # figures are printed to three decimals: smaller differences are not read as wins or gains


def load_samples(path: str, row: int, part: int = 0) -> dict[tuple[int, str, int], dict]:
    """The per-image records of ``row`` of a ``shapes_model.py`` output, keyed by (``part``, caption, seed)."""
    rows = json.loads(Path(path).read_text())["rows"]
    if not 0 <= row < len(rows):
        raise SystemExit(f"{path} has {len(rows)} row(s); --row {row} does not exist")
    if "per_sample" not in rows[row]:
        raise SystemExit(f"{path} holds no per-image records: it was written before shapes_model.py kept them; "
                         f"measure the model again")
    return {(part, s["caption"], s["seed"]): s for s in rows[row]["per_sample"]}


def paired_figures(candidate: dict[tuple, dict], baseline: dict[tuple, dict]
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{figure: (candidate values, baseline values)}`` aligned by key (part, caption, seed), one per figure."""
    from shapes import scenes

    if candidate.keys() != baseline.keys():
        only = [key[1:] for key in sorted(candidate.keys() ^ baseline.keys())[:3]]
        raise SystemExit(f"the two files hold different (caption, seed) pairs, e.g. {only}: measure both models "
                         f"on the same captions with the same --seeds-per-caption")
    keys = sorted(candidate)

    def values(records, take, kind=None):
        return np.array([take(records[k]) for k in keys if kind is None or records[k]["kind"] == kind], dtype=float)

    def correct_shape(record):
        return record["read_shape"] == scenes.parse_caption(record["caption"]).phrases[0].shape

    figures = {"mean score": (values(candidate, lambda r: r["score"]), values(baseline, lambda r: r["score"])),
               "score > 0.5": (values(candidate, lambda r: r["score"] > 0.5),
                               values(baseline, lambda r: r["score"] > 0.5))}
    for kind in sorted({candidate[k]["kind"] for k in keys}):
        figures[kind] = (values(candidate, lambda r: r["score"], kind), values(baseline, lambda r: r["score"], kind))
    if any(candidate[k]["kind"] == "single" for k in keys):
        figures["single shape accuracy"] = (values(candidate, correct_shape, "single"),
                                            values(baseline, correct_shape, "single"))
    return figures


def verdict(low: float, high: float) -> str:
    return "ahead" if low >= RESOLUTION / 2 else "behind" if high <= -RESOLUTION / 2 else "level"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("candidate", help="shapes_model.py output of the candidate model.")
    parser.add_argument("baseline", help="shapes_model.py output of the model it is compared against.")
    parser.add_argument("--and", dest="more", nargs=2, action="append", default=[],
                        metavar=("CANDIDATE", "BASELINE"), help="Another pair of measurements (e.g. the tuning "
                        "captions) pooled with the first; repeatable.")
    parser.add_argument("--row", type=int, default=0, help="Which row (guidance/steps/sampler setting) of each file.")
    parser.add_argument("--out", default="shapes_model_compare.json")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from jobs.evaluation.stats import compare

    pairs = [(args.candidate, args.baseline), *map(tuple, args.more)]
    candidate, baseline = {}, {}
    for part, (cand, base) in enumerate(pairs):
        candidate |= load_samples(cand, args.row, part)
        baseline |= load_samples(base, args.row, part)
    figures = paired_figures(candidate, baseline)
    for cand, base in pairs:
        print(f"{cand} against {base}")
    print("(paired by caption and seed; 95 % bootstrap intervals)")
    print("| figure | n | candidate | baseline | difference [95 % CI] | wins / losses | verdict |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for name, (cand, base) in figures.items():
        c = compare(cand, base, tie_tolerance=RESOLUTION / 2)
        ci = c.mean_difference_ci
        results[name] = {**c.to_dict(), "verdict": verdict(ci.low, ci.high)}
        print(f"| {name} | {c.n} | {c.mean_candidate:.3f} | {c.mean_baseline:.3f} | {c.mean_difference:+.3f} "
              f"[{ci.low:+.3f}, {ci.high:+.3f}] | {c.wins} / {c.losses} | {results[name]['verdict']} |")
    Path(args.out).write_text(json.dumps({"pairs": pairs, "row": args.row, "figures": results}, indent=2))


if __name__ == "__main__":
    main()
