"""The evaluation report: per-candidate paired statistics written as JSON, Markdown, plots and an image grid.

Input is one table of scored generations (a row per sampler x prompt x sample) with the columns of the
generate job's metrics: ``sampler``, ``prompt_id``, ``sample_idx``, ``prompt``, ``score``, ``nfe``,
``gen_seconds``, ``image_uri`` and optionally ``category``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from jobs.evaluation.stats import compare

KEY = ["prompt_id", "sample_idx"]


def paired_table(scores: pd.DataFrame, baseline: str, candidate: str) -> pd.DataFrame:
    """Rows where both samplers produced a score for the same (prompt_id, sample_idx)."""
    base = scores[scores.sampler == baseline].set_index(KEY)
    cand = scores[scores.sampler == candidate].set_index(KEY)
    joined = cand[["score"]].join(base[["score"]], lsuffix="_candidate", rsuffix="_baseline", how="inner")
    if "category" in scores.columns:
        joined = joined.join(base[["category"]])
    return joined.dropna(subset=["score_candidate", "score_baseline"])


def summarize(scores: pd.DataFrame, baseline: str, candidates: list[str], seed: int = 0,
              specs: dict[str, str] | None = None) -> dict:
    """Everything the report shows, as plain data (the JSON report).

    ``specs`` maps a sampler's folder-safe name (the ``sampler`` column) to the spec the user wrote, e.g.
    ``vanilla_token_temperature_0.25-77cc9e`` -> ``vanilla:token_temperature=0.25``; the report shows the spec.
    """
    per_sampler = {}
    for sampler, rows in scores.groupby("sampler"):
        ok = rows[rows.error.isna()] if "error" in rows.columns else rows
        seconds = ok.gen_seconds.sum()
        per_sampler[sampler] = {
            "images": int(len(ok)), "errors": int(len(rows) - len(ok)),
            "mean_score": float(ok.score.mean()) if len(ok) else float("nan"),
            "nfe": float(ok.nfe.mean()) if len(ok) else float("nan"),
            "images_per_second": float(len(ok) / seconds) if seconds > 0 else float("nan"),
        }
    comparisons = {}
    for candidate in candidates:
        pairs = paired_table(scores, baseline, candidate)
        if pairs.empty:
            raise ValueError(f"no paired scores for candidate {candidate!r} against {baseline!r}: were both "
                             "generated with a scorer?")
        entry = {"overall": compare(pairs.score_candidate.to_numpy(), pairs.score_baseline.to_numpy(),
                                    seed).to_dict()}
        if "category" in pairs.columns and pairs.category.notna().any():
            entry["by_category"] = {
                str(category): compare(group.score_candidate.to_numpy(), group.score_baseline.to_numpy(),
                                       seed).to_dict()
                for category, group in pairs.groupby("category")
            }
        comparisons[candidate] = entry
    specs = {name: (specs or {}).get(name, name) for name in [baseline, *candidates]}
    return {"baseline": baseline, "candidates": candidates, "specs": specs, "samplers": per_sampler,
            "comparisons": comparisons}


def markdown(summary: dict) -> str:
    """The results table, one row per candidate, plus per-category tables."""
    baseline, specs = summary["baseline"], summary["specs"]
    lines = [f"# Sampler evaluation against `{specs[baseline]}`", "",
             f"Baseline mean score {summary['samplers'][baseline]['mean_score']:.4f}, "
             f"NFE {summary['samplers'][baseline]['nfe']:.0f} per kept image.", "",
             "| candidate | n | wins / ties / losses | win rate (95% CI) | mean score (95% CI) | "
             "mean diff (95% CI) | sign-test p | NFE per kept image | kept images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for candidate, entry in summary["comparisons"].items():
        lines.append(_row(specs[candidate], entry["overall"], summary["samplers"][candidate]))
    for candidate, entry in summary["comparisons"].items():
        if "by_category" in entry:
            lines += ["", f"## `{specs[candidate]}` by category", "",
                      "| category | n | wins / ties / losses | win rate (95% CI) | mean diff (95% CI) | sign-test p |",
                      "|---|---|---|---|---|---|"]
            for category, c in entry["by_category"].items():
                lines.append(f"| {category} | {c['n']} | {c['wins']} / {c['ties']} / {c['losses']} | "
                             f"{_pct(c['win_rate'], c['win_rate_ci'])} | "
                             f"{_num(c['mean_difference'], c['mean_difference_ci'])} | {c['sign_test_p']:.3g} |")
    return "\n".join(lines) + "\n"


def _row(name: str, c: dict, sampler: dict) -> str:
    return (f"| `{name}` | {c['n']} | {c['wins']} / {c['ties']} / {c['losses']} | "
            f"{_pct(c['win_rate'], c['win_rate_ci'])} | {_num(c['mean_candidate'], c['mean_candidate_ci'])} | "
            f"{_num(c['mean_difference'], c['mean_difference_ci'])} | {c['sign_test_p']:.3g} | "
            f"{sampler['nfe']:.0f} | {sampler['images_per_second']:.2f} |")


def _pct(value: float, ci: dict) -> str:
    return f"{100 * value:.1f}% ({100 * ci['low']:.1f}–{100 * ci['high']:.1f})"


def _num(value: float, ci: dict) -> str:
    return f"{value:+.4f} ({ci['low']:+.4f}, {ci['high']:+.4f})"


def plot_win_rates(summary: dict, path: Path) -> None:
    """Bar chart of win rates with their 95% bootstrap intervals; 50% marks a coin flip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["comparisons"])
    rates = [summary["comparisons"][n]["overall"]["win_rate"] * 100 for n in names]
    lows = [r - summary["comparisons"][n]["overall"]["win_rate_ci"]["low"] * 100 for n, r in zip(names, rates)]
    highs = [summary["comparisons"][n]["overall"]["win_rate_ci"]["high"] * 100 - r for n, r in zip(names, rates)]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 3.5))
    ax.bar(names, rates, yerr=[lows, highs], capsize=4, color="#4c72b0")
    ax.axhline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel(f"win rate vs {summary['baseline']} (%)")
    ax.set_ylim(0, 100)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_score_distributions(scores: pd.DataFrame, samplers: list[str], path: Path) -> None:
    """One box per sampler of its per-image scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [scores[scores.sampler == s].score.dropna().to_numpy() for s in samplers]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(samplers) + 2), 3.5))
    ax.boxplot(data, tick_labels=samplers, showmeans=True)
    ax.set_ylabel("score")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def image_grid(scores: pd.DataFrame, samplers: list[str], read_bytes: Callable[[str], bytes], path: Path,
               prompts: int = 4, cell: int = 128) -> None:
    """A grid: one row per prompt (sample 0) headed by the prompt's text, one column per sampler, each cell
    captioned with its score."""
    from PIL import Image, ImageDraw

    first = scores[(scores.sample_idx == 0) & scores.image_uri.notna()]
    common = set.intersection(*(set(first[first.sampler == s].prompt_id) for s in samplers))
    chosen = sorted(common)[:prompts]
    if not chosen:
        return
    line = 14
    height = cell + 2 * line  # the prompt above the images, the scores below
    width = cell * len(samplers)
    grid = Image.new("RGB", (width, height * len(chosen) + line), "white")
    draw = ImageDraw.Draw(grid)
    for col, sampler in enumerate(samplers):
        draw.text((col * cell + 2, 1), sampler[:22], fill="black")
    for row, prompt_id in enumerate(chosen):
        top = line + row * height
        prompt = str(first[first.prompt_id == prompt_id].iloc[0].prompt)
        draw.text((2, top + 1), fit_text(draw, prompt, width - 4), fill="#1f3b73")
        for col, sampler in enumerate(samplers):
            record = first[(first.sampler == sampler) & (first.prompt_id == prompt_id)].iloc[0]
            image = Image.open(io.BytesIO(read_bytes(record.image_uri))).convert("RGB").resize((cell, cell))
            grid.paste(image, (col * cell, top + line))
            draw.text((col * cell + 2, top + line + cell), f"{record.score:.3f}", fill="black")
    grid.save(path)


def fit_text(draw, text: str, width: int) -> str:
    """``text`` cut with an ellipsis so that it fits ``width`` pixels in ``draw``'s font."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def write_report(scores: pd.DataFrame, baseline: str, candidates: list[str], out: Path,
                 read_bytes: Callable[[str], bytes], seed: int = 0, specs: dict[str, str] | None = None) -> dict:
    """Write report.json, report.md, win_rates.png, scores.png and grid.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(scores, baseline, candidates, seed, specs)
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    (out / "report.md").write_text(markdown(summary))
    plot_win_rates(summary, out / "win_rates.png")
    plot_score_distributions(scores, [baseline, *candidates], out / "scores.png")
    image_grid(scores, [baseline, *candidates], read_bytes, out / "grid.png")
    return summary


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__}")
