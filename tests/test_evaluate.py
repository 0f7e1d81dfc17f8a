"""``maskray evaluate`` end to end on real Ray with a tiny model and the tiny HPS scorer."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

from jobs.evaluation.run import EvaluateOptions, run_evaluate, split_candidates
from pipeline.prompt_sets import PromptSetError, load_prompt_set

SETTINGS = {"steps": 3, "width": 32, "height": 32}


def test_candidate_lists_split_at_top_level_commas():
    assert split_candidates("noise,differential") == ["noise", "differential"]
    assert split_candidates("noise,zsampling+noise:noise.amplitude=1.5,zsampling.num_steps=2,all") == [
        "noise", "zsampling+noise:noise.amplitude=1.5,zsampling.num_steps=2", "all"]
    assert split_candidates("vanilla:gumbel_temperature=[3,0],noise") == ["vanilla:gumbel_temperature=[3,0]", "noise"]
    assert EvaluateOptions(candidates="noise,differential").candidates == ["noise", "differential"]


def test_prompt_set_formats(tmp_path):
    (tmp_path / "anime.json").write_text(json.dumps(["a cat", "a dog"]))
    (tmp_path / "photo.json").write_text(json.dumps(["a car"]))
    table = load_prompt_set([str(tmp_path / "anime.json"), str(tmp_path / "photo.json")])
    assert table.to_pylist() == [{"prompt": "a cat", "category": "anime"}, {"prompt": "a dog", "category": "anime"},
                                 {"prompt": "a car", "category": "photo"}]
    (tmp_path / "draw.csv").write_text("Prompts,Category\na red car,Colors\n\"a, b\",Counting\n")
    assert load_prompt_set([str(tmp_path / "draw.csv")]).column("category").to_pylist() == ["Colors", "Counting"]
    (tmp_path / "bad.json").write_text(json.dumps([{"text_x": 1}]))
    with pytest.raises(PromptSetError, match="no prompt column"):
        load_prompt_set([str(tmp_path / "bad.json")])
    with pytest.raises(PromptSetError, match="does not exist"):
        load_prompt_set([str(tmp_path / "missing.txt")])


def test_end_to_end_and_rerun_generates_only_the_new_candidate(ray_local, tmp_path, fixtures_dir):
    from mgt.config import GenerationSettings, ModelConfig
    from pipeline.config import JobOptions

    prompts = tmp_path / "set.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "category": c}) for p, c in [
        ("a red circle", "colour"), ("a blue square", "colour"), ("a circle left of a square", "position")]))
    hps = fixtures_dir / "hps-tiny"
    job = JobOptions(scorer="hps-v2", scorer_checkpoint=str(hps / "hps_tiny_checkpoint.pt"),
                     scorer_model=str(hps / "model_config.json"), batch_size=3)
    model, generation = ModelConfig(model="tiny-meissonic", device="cpu"), GenerationSettings(**SETTINGS)
    out = tmp_path / "eval"
    options = EvaluateOptions(prompts=[str(prompts)], out=str(out), candidates=["noise"], seeds_per_prompt=2)
    summary = run_evaluate(options, job, model, generation, log=lambda _: None)

    report = json.loads((out / "report" / "report.json").read_text())
    assert summary.pop("failed_samples") == {}  # every sampler's run is whole (else `maskray evaluate` exits 3)
    assert report == json.loads(json.dumps(summary))
    overall = report["comparisons"]["noise"]["overall"]
    assert overall["n"] == 6 and overall["wins"] + overall["ties"] + overall["losses"] == 6
    assert set(report["comparisons"]["noise"]["by_category"]) == {"colour", "position"}
    assert report["samplers"]["vanilla"]["nfe"] == 3
    assert "| `noise` | 6 |" in (out / "report" / "report.md").read_text()
    for name in ("win_rates.png", "scores.png", "grid.png"):
        Image.open(out / "report" / name).verify()
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert [r.split("-")[0] for r in runs] == ["noise", "vanilla"]
    for run in runs:  # each sampler's run records its own pools, not those of the run before it
        actors = json.loads((out / "runs" / run / "manifest.json").read_text())["attempts"][0]["actors"]
        assert actors["generator"]["actors"] == actors["scorer"]["actors"] == 1, (run, actors)
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("images/*")}

    more = options.model_copy(update={"candidates": ["noise", "zsampling", "vanilla:best_of=2"]})
    summary = run_evaluate(more, job, model, generation, log=lambda _: None)
    after = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("images/*")}
    assert {p: t for p, t in after.items() if p in before} == before  # nothing regenerated
    new = [p for p in after if p not in before]
    assert len(new) == 12 and sum("zsampling" in str(p) for p in new) == 6  # best-of-2: only its kept images
    assert summary["samplers"]["zsampling"]["nfe"] == 3 * 3 - 2
    best = next(name for name in summary["samplers"] if name.startswith("vanilla_best_of_2"))
    assert summary["samplers"][best]["nfe"] == 2 * 3 and summary["samplers"][best]["images"] == 6  # per kept image
    assert summary["comparisons"][best]["overall"]["mean_difference"] >= 0  # the better of 2 vs candidate 0
    manifest = json.loads(next((out / "runs").glob("vanilla-*/manifest.json")).read_text())
    assert manifest["counts"]["generated"] == 0  # second attempt found everything done
    seeds = [pd.read_parquet(p, filters=[("candidate", "=", 0)]).set_index(["prompt_id", "sample_idx"]).seed.sort_index()
             for p in sorted((out / "runs").glob("*/metrics.parquet"))]
    assert all(s.equals(seeds[0]) for s in seeds) and seeds[0].nunique() == 6  # same seed per pair, all samplers
    metrics = pd.read_parquet(next((out / "runs").glob("zsampling-*/metrics.parquet")))
    assert metrics.score.notna().all()


def test_a_layout_without_image_files_is_refused_before_anything_runs(tmp_path):
    from mgt.config import GenerationSettings, ModelConfig
    from pipeline.config import JobOptions

    job = JobOptions(layout="webdataset", scorer="clip")
    with pytest.raises(ValueError, match="layout webdataset does not write; use --layout both or files"):
        run_evaluate(EvaluateOptions(out=str(tmp_path / "eval")), job, ModelConfig(), GenerationSettings())
    assert not (tmp_path / "eval").exists()
