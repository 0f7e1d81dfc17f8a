"""The report of a ``maskray generate`` run, written under ``--out/report/`` for people to look at:

    scores.png        score histogram (kept vs dropped when the run curated with --best-of / --min-score)
    top.png           the 16 best-scored kept images, each captioned with its prompt and score
    bottom.png        the 16 worst-scored kept images (without a scorer: 16 images drawn at random)
    categories.md     mean score per prompt ``category`` (when the prompts have one)
    report.html       a static page: the counts, the plots, thumbnails with captions and scores (no script)
    report.json       the figures above as data

It reads the run's metrics table and, of the images, only the few it shows, through the run's layout
(``ImageSink.read_images``: a file, a tar's byte range or a Parquet row group), so it costs seconds whatever
the run's size (``tests/benchmarks/run_report.py`` measures it at 10^5 rows).
"""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.manifest import read_manifest, read_metrics
from pipeline.prompts import prompt_ids
from pipeline.sinks.registry import build_sink
from pipeline.storage import OutFileError, Storage

SHOWN = 16  # images per contact sheet
HTML_SAMPLE = 48  # images drawn at random for the page, besides the top and bottom ones
CELL, THUMB = 192, 160  # contact-sheet cell and page thumbnail sizes (pixels)
COLUMNS = ["prompt_id", "sample_idx", "candidate", "prompt", "score", "kept", "error", "image_uri", "image_offset",
           "image_bytes"]


def write_run_report(out_uri: str, storage_options: dict | None = None, seed: int = 0) -> dict:
    """Write ``report/`` under the run at ``out_uri`` (local or object store); returns the report's figures.

    Raises:
        ValueError: ``out_uri`` holds no finished run (no ``manifest.json`` or ``metrics.parquet/``).
    """
    out = Storage(out_uri, storage_options or {})
    manifest = read_manifest(out)
    if manifest is None or not out.exists(out.path("metrics.parquet")):
        raise ValueError(f"{out.uri} holds no finished maskray generate run (no manifest.json or metrics.parquet/); "
                         f"give the --out of a run")
    job = manifest["config"]["job"]
    metrics = read_metrics(out, COLUMNS).to_pandas()
    metrics["kept"] = metrics.kept.fillna(metrics.error.isna()).astype(bool)  # older runs: every good row
    metrics = metrics.merge(_categories(job, storage_options or {}), on="prompt_id", how="left")
    sink = build_sink(job.get("layout", "files"), out, job.get("image_format", "png"))
    shown = metrics[metrics.kept & metrics.image_uri.notna()]
    rng = np.random.default_rng(seed)
    scored = shown.score.notna().any()
    if scored:
        ranked = shown.sort_values(["score", "prompt_id", "sample_idx"], ascending=[False, True, True])
        top, bottom = ranked.head(SHOWN), ranked.tail(SHOWN).iloc[::-1]
    else:
        top = shown.iloc[rng.permutation(len(shown))[:SHOWN]]
        bottom = shown.iloc[:0]
    sample = shown.iloc[rng.permutation(len(shown))[:HTML_SAMPLE]]
    wanted = pd.concat([top, bottom, sample]).drop_duplicates(["prompt_id", "sample_idx", "candidate"])
    locations = pa.table({"image_uri": pa.array(wanted.image_uri.tolist(), pa.string()),
                          "image_offset": pa.array([None if pd.isna(o) else int(o) for o in wanted.image_offset],
                                                   pa.int64()),
                          "image_bytes": pa.array([None if pd.isna(b) else int(b) for b in wanted.image_bytes],
                                                  pa.int64())})
    try:
        images = dict(zip(_keys(wanted), sink.read_images(locations)))
    except ValueError as error:  # a forged or foreign metrics row: never read a file outside --out
        raise OutFileError(f"{out.url('metrics.parquet')} has a row whose {error}; the report reads only images "
                           f"under --out: rerun `maskray generate` into this --out to rebuild the metrics from the "
                           f"completion records, or delete the forged record") from None
    summary = _summary(metrics, manifest)
    with tempfile.TemporaryDirectory(prefix="maskray-report-") as folder:
        local = Path(folder)
        if scored:
            _histogram(metrics, local / "scores.png")
        _contact_sheet(top, images, local / "top.png", "best" if scored else "random")
        if len(bottom):
            _contact_sheet(bottom, images, local / "bottom.png", "worst")
        if summary["categories"]:
            (local / "categories.md").write_text(_categories_table(summary["categories"]))
        (local / "report.json").write_text(json.dumps(summary, indent=2))
        (local / "report.html").write_text(_page(summary, top, bottom, sample, images, scored))
        for file in sorted(local.iterdir()):
            out.write_atomic(out.path("report", file.name), file.read_bytes())
    return summary


def _keys(frame: pd.DataFrame) -> list[tuple]:
    return list(zip(frame.prompt_id, frame.sample_idx, frame.candidate.fillna(0)))


def _categories(job: dict, storage_options: dict) -> pd.DataFrame:
    """``prompt_id -> category`` from the run's prompt files, when they have a ``category`` column."""
    import pyarrow.dataset as pds

    from pipeline.prompts import find_prompt_files

    storage = Storage(job["prompts"], storage_options)
    try:
        files = find_prompt_files(job["prompts"], storage)
    except ValueError:  # the prompts moved since the run: the report goes without categories
        return pd.DataFrame({"prompt_id": pd.Series(dtype=object), "category": pd.Series(dtype=object)})
    dataset = pds.dataset(files, filesystem=storage.arrow_fs, format="parquet")
    if "category" not in dataset.schema.names:
        return pd.DataFrame({"prompt_id": pd.Series(dtype=object), "category": pd.Series(dtype=object)})
    columns = [c for c in ("prompt_id", "prompt", "negative_prompt", "seed", "category") if c in dataset.schema.names]
    table = dataset.to_table(columns=columns)
    return pd.DataFrame({"prompt_id": prompt_ids(table), "category": table["category"].to_pylist()})


def _summary(metrics: pd.DataFrame, manifest: dict) -> dict:
    kept = metrics[metrics.kept]
    slots = metrics.groupby(["prompt_id", "sample_idx"]).kept.any()
    summary = {
        "rows": int(len(metrics)), "errors": int(metrics.error.notna().sum()), "kept_images": int(len(kept)),
        "slots": int(len(slots)), "slots_without_kept_image": int((~slots).sum()),
        "mean_score": _mean(metrics.score), "mean_kept_score": _mean(kept.score),
        "config_hash": manifest.get("config_hash"), "model": manifest["config"]["model"]["model"],
        "categories": {},
    }
    if "category" in metrics and metrics.category.notna().any():
        for category, rows in kept.groupby("category"):
            summary["categories"][str(category)] = {"images": int(len(rows)), "mean_score": _mean(rows.score)}
    return summary


def _mean(values: pd.Series) -> float | None:
    values = values.dropna()
    return float(values.mean()) if len(values) else None


def _histogram(metrics: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = metrics[metrics.score.notna()]
    bins = np.histogram_bin_edges(scored.score, bins=30)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    dropped = scored[~scored.kept]
    if len(dropped):
        ax.hist(dropped.score, bins=bins, color="#c44e52", alpha=0.7, label=f"not kept ({len(dropped)})")
    ax.hist(scored[scored.kept].score, bins=bins, color="#4c72b0", alpha=0.8, label=f"kept ({int(scored.kept.sum())})")
    ax.set_xlabel("score")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _contact_sheet(rows: pd.DataFrame, images: dict, path: Path, title: str) -> None:
    """Images in a 4-wide grid, each with two caption lines: its score, then its prompt (cut to fit)."""
    from PIL import Image, ImageDraw

    from jobs.evaluation.report import fit_text

    columns, line = 4, 14
    count = max(len(rows), 1)
    height = CELL + 2 * line
    sheet = Image.new("RGB", (columns * CELL, line + height * -(-count // columns)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 1), f"{title} {len(rows)} kept images", fill="black")
    for n, (key, row) in enumerate(zip(_keys(rows), rows.itertuples())):
        x, y = (n % columns) * CELL, line + (n // columns) * height
        data = images.get(key)
        if data:
            sheet.paste(Image.open(io.BytesIO(data)).convert("RGB").resize((CELL, CELL)), (x, y))
        score = "unscored" if pd.isna(row.score) else f"{row.score:.3f}"
        draw.text((x + 2, y + CELL), score, fill="black")
        draw.text((x + 2, y + CELL + line - 1), fit_text(draw, str(row.prompt), CELL - 4), fill="#1f3b73")
    sheet.save(path)


def _categories_table(categories: dict) -> str:
    lines = ["| category | kept images | mean score |", "|---|---|---|"]
    for name, entry in sorted(categories.items()):
        mean = "n/a" if entry["mean_score"] is None else f"{entry['mean_score']:.4f}"
        lines.append(f"| {name} | {entry['images']} | {mean} |")
    return "\n".join(lines) + "\n"


def _thumbnail(data: bytes | None) -> str:
    """A JPEG thumbnail as a data URI (the page is one self-contained file)."""
    from PIL import Image

    if not data:
        return ""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((THUMB, THUMB))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figures(rows: pd.DataFrame, images: dict) -> str:
    cells = []
    for key, row in zip(_keys(rows), rows.itertuples()):
        score = "unscored" if pd.isna(row.score) else f"{row.score:.3f}"
        cells.append(f'<figure><img src="{_thumbnail(images.get(key))}" width="{THUMB}" alt="">'
                     f"<figcaption><b>{score}</b> {html.escape(str(row.prompt))}<br><small>"
                     f"{html.escape(str(row.prompt_id))} #{row.sample_idx}</small></figcaption></figure>")
    return "<div class=grid>" + "".join(cells) + "</div>"


def _page(summary: dict, top, bottom, sample, images: dict, scored: bool) -> str:
    def fmt(value):
        return "n/a" if value is None else f"{value:.4f}"

    rows = [("rows (candidates)", summary["rows"]), ("failed", summary["errors"]),
            ("kept images", summary["kept_images"]), ("samples without a kept image",
                                                      summary["slots_without_kept_image"]),
            ("mean score, all", fmt(summary["mean_score"])), ("mean score, kept", fmt(summary["mean_kept_score"]))]
    parts = [f"<h1>maskray run report: {html.escape(summary['model'])}</h1>",
             "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"]
    if scored:
        parts.append('<h2>Scores</h2><img src="scores.png" alt="score histogram">')
    if summary["categories"]:
        parts.append("<h2>By category</h2><table><tr><th>category</th><th>kept images</th><th>mean score</th></tr>"
                     + "".join(f"<tr><td>{html.escape(c)}</td><td>{e['images']}</td><td>{fmt(e['mean_score'])}</td>"
                               f"</tr>" for c, e in sorted(summary["categories"].items())) + "</table>")
    parts.append(f"<h2>{'Best' if scored else 'Random'} {len(top)}</h2>" + _figures(top, images))
    if len(bottom):
        parts.append(f"<h2>Worst {len(bottom)}</h2>" + _figures(bottom, images))
    parts.append(f"<h2>{len(sample)} drawn at random</h2>" + _figures(sample, images))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
             "th,td{padding:2px 10px;text-align:left;border-bottom:1px solid #ddd}.grid{display:flex;flex-wrap:wrap;"
             "gap:10px}figure{margin:0;width:" + str(THUMB) + "px;font-size:12px}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>maskray run report</title><style>{style}"
            f"</style></head><body>{''.join(parts)}</body></html>\n")
