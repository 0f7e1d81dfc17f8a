"""The run report (``jobs/run_report.py``, ``maskray report OUT``) over a curated run in every layout, without Ray:
the sink writes a best-of-2 shard of real PNGs, ``finalize`` closes the run, the report reads the images it shows
back through the layout."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import manifest
from pipeline.config import GenerateConfig
from pipeline.curation import Curation
from pipeline.shards import Shard
from pipeline.sinks.datasink import SampleSink
from pipeline.storage import Storage


def _png(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), level, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _curated_run(tmp_path, layout: str) -> str:
    ids = [f"p{i}" for i in range(10)]
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt_id": ids, "prompt": [f"shape {i}" for i in ids],
                             "category": ["round" if i < 5 else "square" for i in range(10)]}), prompts)
    out = str(tmp_path / "out")
    config = GenerateConfig(job={"prompts": str(prompts), "out": out, "layout": layout, "best_of": 2,
                                 "min_score": 0.1, "scorer": "clip"})
    storage = Storage(out)
    record = manifest.start_attempt(storage, config, None, [str(prompts)], 0, 20)
    sink = SampleSink(storage, {**dict.fromkeys(("model", "quantization", "sampler", "sampler_hash")),
                                "config_hash": config.config_hash(), "scorer": "clip", "attempt": 0}, "png",
                      layout=layout, curation=Curation(best_of=2, min_score=0.1))
    keys = [(p, c) for p in ids for c in range(2)]
    scores = [(i * 2 + c) / 20 for i in range(10) for c in range(2)]  # p0 scores 0.0 / 0.05: dropped
    sink.write_table(pa.table({
        "prompt_id": [p for p, _ in keys], "sample_idx": [0] * 20, "candidate": [c for _, c in keys],
        "prompt": [f"shape {p}" for p, _ in keys], "negative_prompt": [""] * 20, "seed": list(range(20)),
        "image": [_png(int(255 * s)) for s in scores], "nfe": [2] * 20, "gen_seconds": [0.1] * 20,
        "error": [""] * 20, "score": scores, "shard": ["s"] * 20, "shard_samples": [20] * 20}))
    result = manifest.finalize(sink, record, [Shard("s", str(prompts), 0, 10, 20)], 1.0)
    assert (result.rows, result.kept, result.dropped) == (20, 9, {"below_min_score": 1, "no_good_candidate": 0})
    return out


@pytest.mark.parametrize("layout", ["files", "webdataset", "parquet"])
def test_the_report_shows_the_best_and_worst_kept_images_with_captions(tmp_path, layout):
    from jobs.run_report import write_run_report

    out = _curated_run(tmp_path, layout)
    summary = write_run_report(out)
    assert (summary["kept_images"], summary["slots_without_kept_image"]) == (9, 1)
    assert summary["categories"]["square"]["mean_score"] == pytest.approx(np.mean([0.55, 0.65, 0.75, 0.85, 0.95]))
    report = tmp_path / "out" / "report"
    assert sorted(p.name for p in report.iterdir()) == ["bottom.png", "categories.md", "report.html", "report.json",
                                                        "scores.png", "top.png"]
    top = np.asarray(Image.open(report / "top.png").convert("RGB"))
    assert top[14 + 20, 20].tolist() == [242] * 3  # the first cell is the best image (score 0.95)
    bottom = np.asarray(Image.open(report / "bottom.png").convert("RGB"))
    assert bottom[14 + 20, 20].tolist() == [38] * 3  # the worst kept image: p1's candidate 1 (0.15)
    page = (report / "report.html").read_text()
    assert "shape p9" in page and "0.950" in page and "<script" not in page and page.count("data:image/jpeg") >= 18
    assert json.loads((report / "report.json").read_text())["kept_images"] == 9


def test_maskray_report_refuses_a_folder_without_a_run(tmp_path, capsys):
    from jobs.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert "holds no finished maskray generate run" in capsys.readouterr().err
