"""Curated runs (``pipeline.curation``): ``--best-of N --keep K``, ``--min-score``, ``--keep-all-images``.

Without Ray: candidate seeds (candidate 0 is the plain sample, batch-invariant), the config hash of runs without
the options, the refusals before Ray, the selection rule (ties to the lower candidate), assembly writing only
kept images. On real Ray (loopback, tiny model, tiny HPS scorer): a best-of run keeps every candidate's metrics
row and only the best images, its candidate 0 is a plain run's sample, and a driver killed in the middle of a
best-of run is rerun to one row per (slot, candidate) and one kept image per slot.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from generate_helpers import config, shards
from test_generate_resume import REPO, _kill_tree

from pipeline.config import GenerateConfig
from pipeline.curation import Curation
from pipeline.prompts import candidate_seed, expand_samples
from pipeline.sinks.datasink import SampleSink
from pipeline.storage import Storage

RUN = {"model": "m", "quantization": "fp32", "sampler": "{}", "sampler_hash": "h", "config_hash": "c",
       "scorer": "hps-v2", "attempt": 0}


def _prompts(ids: list[str]) -> dict[str, np.ndarray]:
    return {"prompt_id": np.array(ids, dtype=object), "prompt": np.array([f"shape {i}" for i in ids], dtype=object),
            "num_images": np.array([2] * len(ids))}


def test_candidate_0_is_the_plain_sample_and_candidates_do_not_depend_on_the_batch():
    plain = expand_samples(_prompts(["a", "b"]), run_seed=7, num_images=1)
    three = expand_samples(_prompts(["a", "b"]), run_seed=7, num_images=1, best_of=3)
    assert list(three["candidate"]) == [0, 1, 2] * 4 and list(plain["candidate"]) == [0] * 4
    assert list(three["seed"][three["candidate"] == 0]) == list(plain["seed"])
    alone = np.concatenate([expand_samples(_prompts([p]), run_seed=7, num_images=1, best_of=3)["seed"]
                            for p in ("a", "b")])
    assert list(alone) == list(three["seed"]) and len(set(three["seed"])) == 12
    assert candidate_seed(5, 0) == 5 and candidate_seed(5, 1) == candidate_seed(5, 1) != candidate_seed(5, 2)
    written = {**_prompts(["a"]), "kept_samples": np.array([np.array([[0, 1], [1, 0]])], dtype=object)}
    todo = expand_samples(written, run_seed=7, num_images=1, best_of=2)
    assert list(zip(todo["sample_idx"], todo["candidate"])) == [(0, 0), (1, 1)]


def test_the_options_hash_only_when_set_and_are_refused_without_a_scorer():
    plain = GenerateConfig()
    assert plain.config_hash() == GenerateConfig(job={"best_of": 1, "keep": 1}).config_hash()
    assert "best_of" not in plain.hashed_factors()["job"]
    curated = GenerateConfig(job={"best_of": 4, "scorer": "clip"})
    assert curated.config_hash() != GenerateConfig(job={"scorer": "clip"}).config_hash()
    assert curated.hashed_factors()["job"]["best_of"] == 4
    with pytest.raises(ValueError, match="--best-of 4 selects images by score, but no scorer is set; add --scorer"):
        GenerateConfig(job={"best_of": 4})
    with pytest.raises(ValueError, match="--min-score 0.2 selects images by score"):
        GenerateConfig(job={"min_score": 0.2})
    with pytest.raises(ValueError, match="--keep 3 is more than --best-of 2"):
        GenerateConfig(job={"best_of": 2, "keep": 3, "scorer": "clip"})


def test_the_best_candidates_are_kept_ties_to_the_lower_index_and_min_score_drops():
    columns = {"prompt_id": ["a"] * 3 + ["b"] * 3 + ["c"] * 3, "sample_idx": [0] * 9,
               "candidate": [0, 1, 2] * 3, "score": [0.1, 0.5, 0.5, 0.9, None, 0.2, 0.05, 0.01, 0.02],
               "error": [None] * 4 + ["RuntimeError: x"] + [None] * 4}
    assert Curation(3, 1).kept(columns) == [False, True, False, True, False, False, True, False, False]
    assert Curation(3, 2).kept(columns) == [False, True, True, True, False, True, True, False, True]
    assert Curation(3, 1, min_score=0.3).kept(columns) == [False, True, False, True] + [False] * 5
    assert Curation().kept(columns) == [True] * 4 + [False] + [True] * 4  # no curation: every good row


def _rows(keys: list[tuple[str, int, int]], scores: list[float], size: int) -> pa.Table:
    count = len(keys)
    return pa.table({"prompt_id": [k for k, _, _ in keys], "sample_idx": [i for _, i, _ in keys],
                     "candidate": [c for _, _, c in keys], "prompt": ["p"] * count, "negative_prompt": [""] * count,
                     "seed": list(range(count)), "image": [f"img-{k}-{i}-{c}".encode() for k, i, c in keys],
                     "nfe": [2] * count, "gen_seconds": [0.1] * count, "error": [""] * count,
                     "score": scores, "shard": ["s"] * count, "shard_samples": [size] * count})


@pytest.mark.parametrize("layout", ["files", "webdataset", "parquet"])
def test_assembly_writes_only_the_kept_candidates_images(tmp_path, layout):
    out = Storage(str(tmp_path / "out"))
    sink = SampleSink(out, RUN, "png", layout=layout, curation=Curation(best_of=2, min_score=0.2))
    keys = [("a", 0, 0), ("a", 0, 1), ("b", 0, 0), ("b", 0, 1)]
    assert sink.write_table(_rows(keys[:3], [0.3, 0.6, 0.1], 4)) == []
    assert not (tmp_path / "out" / "images").exists()  # nothing is written before the slot's candidates are in
    assert sink.write_table(_rows(keys[3:], [0.15], 4)) == ["s"]
    record = pq.read_table(tmp_path / "out" / "_shards" / "s.parquet")
    assert record["candidate"].to_pylist() == [0, 1, 0, 1] and record["kept"].to_pylist() == [False, True] + [False] * 2
    (uri,) = [u for u in record["image_uri"].to_pylist() if u]
    assert sink.images.read_images(record.filter(record["kept"])) == [b"img-a-0-1"]
    if layout == "files":
        assert uri.endswith("_0c1.png") and len(list((tmp_path / "out" / "images").iterdir())) == 1


def test_a_best_of_run_keeps_every_candidate_row_and_the_best_images(ray_local, tmp_path, fixtures_dir):
    from pipeline.generate import run_generate

    hps = fixtures_dir / "hps-tiny"
    scorer = {"scorer": "hps-v2", "scorer_checkpoint": str(hps / "hps_tiny_checkpoint.pt"),
              "scorer_model": str(hps / "model_config.json")}
    shards(tmp_path / "prompts", count=1, per_shard=3)
    plain = run_generate(config(str(tmp_path / "prompts"), str(tmp_path / "plain"), **scorer), log=lambda _: None)
    lines: list[str] = []
    cfg = config(str(tmp_path / "prompts"), str(tmp_path / "out"), best_of=3, keep_all_images=True,
                 layout="parquet", **scorer)
    result = run_generate(cfg, log=lines.append)
    assert (result.rows, result.expected, result.kept, result.errors) == (9, 9, 3, 0)
    assert result.dropped == {"below_min_score": 0, "no_good_candidate": 0} and any("kept 3 image" in x for x in lines)
    metrics = pq.read_table(tmp_path / "out" / "metrics.parquet").sort_by([("prompt_id", "ascending"),
                                                                           ("candidate", "ascending")])
    base = pq.read_table(tmp_path / "plain" / "metrics.parquet").sort_by("prompt_id")
    first = metrics.filter(pc.equal(metrics["candidate"], 0))
    assert first["seed"].to_pylist() == base["seed"].to_pylist()  # candidate 0 is the plain run's sample
    assert np.allclose(first["score"].to_numpy(), base["score"].to_numpy())
    scores = np.array(metrics["score"].to_pylist()).reshape(3, 3)
    assert metrics["kept"].to_pylist() == [bool(c == np.argmax(row)) for row in scores for c in range(3)]
    assert result.mean_kept_score == pytest.approx(scores.max(axis=1).mean())
    assert result.mean_kept_score >= plain.mean_score
    data = pq.read_table(tmp_path / "out" / "data")
    assert data.num_rows == 9 and sum(data["kept"].to_pylist()) == 3  # --keep-all-images: every candidate


def test_a_driver_killed_in_a_best_of_run_is_rerun_to_exactly_one_row_per_candidate(ray_local, tmp_path,
                                                                                     fixtures_dir):
    from pipeline.generate import run_generate

    hps = fixtures_dir / "hps-tiny"
    # 8 shards of 4 candidate rows: on a quiet machine 4 shards were all written before the kill could land
    ids = shards(tmp_path / "prompts", count=4, per_shard=4, separator="-")
    out, records = tmp_path / "out", tmp_path / "out" / "_shards"
    scorer = ["--scorer", "hps-v2", "--scorer-checkpoint", str(hps / "hps_tiny_checkpoint.pt"),
              "--scorer-model", str(hps / "model_config.json")]
    command = [sys.executable, "-m", "jobs.cli", "generate", "--prompts", str(tmp_path / "prompts"), "--out",
               str(out), "--batch-size", "2", "--steps", "2", "--width", "32", "--height", "32", "--shard-size", "4",
               "--best-of", "2", *scorer]
    driver = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 150
    try:
        while driver.poll() is None and time.monotonic() < deadline and not list(records.glob("*.parquet")):
            time.sleep(0.05)
    finally:
        _kill_tree(driver)
    before = {p.name: p.read_bytes() for p in records.glob("*.parquet")}
    assert 1 <= len(before) < 8, "the driver was not killed mid-run"

    cfg = config(str(tmp_path / "prompts"), str(out), best_of=2, scorer="hps-v2",
                 scorer_checkpoint=str(hps / "hps_tiny_checkpoint.pt"), scorer_model=str(hps / "model_config.json"))
    result = run_generate(cfg, log=lambda _: None)
    assert (result.rows, result.expected, result.kept, result.errors) == (32, 32, 16, 0)
    assert all((records / name).read_bytes() == blob for name, blob in before.items())  # done shards not redone
    metrics = pq.read_table(out / "metrics.parquet")
    keys = sorted(zip(metrics["prompt_id"].to_pylist(), metrics["sample_idx"].to_pylist(),
                      metrics["candidate"].to_pylist()))
    assert keys == sorted((p, 0, c) for p in ids for c in range(2))
    kept = metrics.filter(metrics["kept"])
    assert sorted(kept["prompt_id"].to_pylist()) == sorted(ids)  # one kept candidate per slot
    images = {path.name for path in (out / "images").iterdir()}
    assert {Path(uri).name for uri in kept["image_uri"].to_pylist()} <= images and not (out / "_pieces").exists()
    # Known leftover (docs/curation.md): an assembly the kill interrupted may have written the image of a candidate
    # that the rerun's selection no longer keeps (near-tied scores move with the scorer's batch); at most one per
    # shard that was in flight, never a missing image or row.
    assert len(images) - 16 <= 4
