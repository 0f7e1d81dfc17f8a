"""``maskray generate`` end to end on real Ray (loopback, 2 CPUs), tiny models: local disk, S3 (moto server),
a generator actor killed mid-run, and refusals that leave ``--out`` untouched."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from generate_helpers import check_exactly_once, config, shards
from PIL import Image


def test_end_to_end_local_with_tiny_hps(ray_local, tmp_path, fixtures_dir):
    from pipeline.generate import run_generate

    ids = shards(tmp_path / "prompts", count=3, per_shard=2)
    hps = fixtures_dir / "hps-tiny"
    cfg = config(str(tmp_path / "prompts"), str(tmp_path / "out"), num_images=2, layout="both",
                 scorer="hps-v2", scorer_checkpoint=str(hps / "hps_tiny_checkpoint.pt"),
                 scorer_model=str(hps / "model_config.json"))
    summary = run_generate(cfg, log=lambda _: None)
    assert (summary.rows, summary.errors, summary.generated) == (12, 0, 12)
    metrics = pq.read_table(tmp_path / "out" / "metrics.parquet")
    check_exactly_once(metrics, ids, 2)
    assert np.isfinite(metrics["score"].to_numpy()).all() and summary.mean_score is not None
    assert set(metrics["nfe"].to_pylist()) == {2} and metrics["error"].null_count == 12
    assert set(metrics["config_hash"].to_pylist()) == {cfg.config_hash()}
    assert len(list((tmp_path / "out" / "images").iterdir())) == 12
    for uri in metrics["image_uri"].to_pylist():
        assert Path(uri).parent == tmp_path / "out" / "images"
        assert Image.open(uri).convert("RGB").size == (32, 32)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["rows"] == 12
    assert manifest["packages"]["ray"] == ray_local.__version__ and manifest["config"]["job"]["seed"] == 0
    tars = sorted(p.stem for p in (tmp_path / "out" / "webdataset").glob("*.tar"))
    assert tars == sorted(p.stem for p in (tmp_path / "out" / "_shards").glob("*.parquet"))
    assert tars == sorted(set(metrics["shard"].to_pylist())) and len(tars) == 6  # default size 1: a prompt (2 samples)


def test_end_to_end_on_s3(ray_local, tmp_path, s3):
    import s3fs

    from pipeline.generate import run_generate
    from pipeline.manifest import read_metrics
    from pipeline.storage import Storage

    fs = s3fs.S3FileSystem(**s3)
    fs.mkdir("bucket")
    ids = shards(tmp_path / "prompts", count=2, per_shard=3)
    fs.put(str(tmp_path / "prompts") + "/", "bucket/prompts/", recursive=True)
    summary = run_generate(config("s3://bucket/prompts/", "s3://bucket/run", storage_options=s3,
                                  image_format="webp"), log=lambda _: None)
    assert (summary.rows, summary.errors) == (6, 0)
    metrics = read_metrics(Storage("s3://bucket/run", s3))
    check_exactly_once(metrics, ids, 1)
    for uri in metrics["image_uri"].to_pylist():
        assert uri.startswith("s3://bucket/run/images/") and uri.endswith(".webp")
        assert Image.open(io.BytesIO(fs.cat_file(uri))).format == "WEBP"
    assert fs.exists("bucket/run/manifest.json")


def test_refusals_leave_out_untouched(tmp_path):
    from pipeline.generate import run_generate
    from pipeline.manifest import RunConfigMismatch
    from pipeline.prompts import PromptInputError

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a", None]}), bad)
    with pytest.raises(PromptInputError, match="null 'prompt'"):
        run_generate(config(str(bad), str(tmp_path / "out")), log=lambda _: None)
    assert not (tmp_path / "out").exists()  # nothing half-written

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"]}), good)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"config_hash": "0123456789ab", "attempts": [],
                                                   "hashed_factors": {"generation": {"steps": 16}}}))
    with pytest.raises(RunConfigMismatch, match=r"generation.steps: 16 -> 2.*choose a new --out"):
        run_generate(config(str(good), str(out)), log=lambda _: None)
    assert [p.name for p in out.iterdir()] == ["manifest.json"]


def test_maskgit_classes_end_to_end_and_resume(ray_local, tmp_path):
    from pipeline.config import GenerateConfig
    from pipeline.generate import run_generate

    examples = Path(__file__).resolve().parents[1] / "examples" / "imagenet_classes.parquet"
    cfg = GenerateConfig.model_validate({"job": {"prompts": str(examples), "out": str(tmp_path / "out"),
                                                 "num_images": 2, "batch_size": 4},
                                         "model": {"model": "tiny-maskgit"}, "generation": {"steps": 4}})
    first = run_generate(cfg, log=lambda _: None)
    classes = pq.read_table(examples)["prompt"].to_pylist()
    assert (first.rows, first.errors, first.generated) == (2 * len(classes), 0, 2 * len(classes))
    metrics = pq.read_table(tmp_path / "out" / "metrics.parquet")
    assert sorted(set(metrics["prompt"].to_pylist())) == sorted(classes) and set(metrics["nfe"].to_pylist()) == {4}
    assert {Image.open(uri).size for uri in metrics["image_uri"].to_pylist()} == {(64, 64)}
    again = run_generate(cfg, log=lambda _: None)
    assert again.generated == 0 and again.errors == 0
