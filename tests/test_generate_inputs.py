"""``maskray generate`` without Ray: input checks, sample expansion, names, config hash, the stage classes
on dict batches, and the sink on a local folder."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import CURATION_OPTIONS, HASHED_OPTIONS, UNHASHED_OPTIONS, GenerateConfig, JobOptions
from pipeline.pools import plan_stages
from pipeline.prompt_sets import read_prompts
from pipeline.prompts import PromptInputError, expand_samples, prompt_ids, scan_prompts
from pipeline.sinks.base import image_name
from pipeline.sinks.datasink import SampleSink
from pipeline.storage import Storage

SETTINGS = {"steps": 2, "width": 32, "height": 32}


def write(path: Path, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def scan(path, num_images: int = 1):
    return scan_prompts(str(path), Storage(str(path)), num_images)


# ---------------------------------------------------------------------------------------------------
# input checks


def test_scan_counts_shards_folder_and_glob(tmp_path):
    write(tmp_path / "in" / "a.parquet", prompt=["x", "y"], num_images=[1, 3])
    write(tmp_path / "in" / "b.parquet", prompt=["z"], num_images=pa.array([None], pa.int64()))
    for spec in (tmp_path / "in", f"{tmp_path}/in/*.parquet"):
        found = scan(spec, num_images=2)
        assert (len(found.files), found.rows, found.samples) == (2, 3, 6)


@pytest.mark.parametrize("columns, message", [
    ({"text": ["a"]}, "no 'prompt' column"),
    ({"prompt": pa.array([], pa.string())}, "holds no rows"),
    ({"prompt": ["a", None, "c"]}, "1 null 'prompt'"),
    ({"prompt": [1, 2]}, "column 'prompt' is int64, expected string"),
    ({"prompt": ["a", "b", "c"], "prompt_id": ["p", "q", "p"]}, "duplicate prompt_id"),
    ({"prompt": ["a", "a"]}, "duplicate derived id"),
    ({"prompt": ["a"], "seed": ["7"]}, "column 'seed' is string, expected integer"),
    ({"prompt": ["a"], "num_images": [0]}, r"1 num_images value\(s\) outside \[1, 10000\]: \[0\] at rows \[0\]"),
])
def test_bad_input_is_refused_before_work(tmp_path, columns, message):
    path = write(tmp_path / "p.parquet", **columns)
    with pytest.raises(PromptInputError, match=message):
        scan(path)


def test_unreadable_or_missing_inputs(tmp_path):
    with pytest.raises(PromptInputError, match="does not exist"):
        scan(tmp_path / "nope.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PromptInputError, match="matches no Parquet files"):
        scan(tmp_path / "empty")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(PromptInputError, match="cannot read the Parquet shards"):
        scan(tmp_path / "bad.parquet")


def damaged(path: Path) -> Path:
    """A Parquet file whose footer reads but whose compressed pages do not."""
    write(path, prompt=[f"prompt number {i} " * 20 for i in range(200)])
    data = bytearray(path.read_bytes())
    data[100:400] = bytes(b ^ 0x55 for b in data[100:400])
    path.write_bytes(bytes(data))
    return path


# (files under in/: name -> columns or a writer; fragments the one-line error must hold)
HOSTILE_INPUTS = {
    "prompt types disagree": ({"a": {"prompt": ["x"]}, "b": {"prompt": [1]}},
                              ["column 'prompt' is string in", "a.parquet but int64 in", "b.parquet"]),
    "seed widths disagree": ({"a": {"prompt": ["x"], "seed": pa.array([1], pa.int64())},
                              "b": {"prompt": ["y"], "seed": pa.array([2], pa.int32())}},
                             ["column 'seed' is int64 in", "but int32 in", "b.parquet"]),
    "prompt_id types disagree": ({"a": {"prompt": ["x"], "prompt_id": ["p"]}, "b": {"prompt": ["y"], "prompt_id": [2]}},
                                 ["column 'prompt_id' is string in", "but int64 in"]),
    "num_images in one file only": ({"a": {"prompt": ["x"]}, "b": {"prompt": ["y"], "num_images": [2]}},
                                    ["column 'num_images' is in", "b.parquet but not in", "a.parquet"]),
    "not Parquet": ({"a": {"prompt": ["x"]}, "b": b"PAR1 but not really"},
                    ["b.parquet is not a readable Parquet file"]),
    "damaged pages": ({"a": {"prompt": ["x"]}, "b": damaged}, ["b.parquet is damaged", "rewrite it or remove it"]),
    "10^12 images": ({"a": {"prompt": ["x", "y"], "num_images": [1, 10**12]}},
                     ["a.parquet: 1 num_images value(s) outside [1, 10000]", "[1000000000000] at rows [1]"]),
    "seed -1": ({"a": {"prompt": ["x", "y"], "seed": [0, -1]}},
                ["a.parquet: 1 seed value(s) outside [0, 9223372036854775807]: [-1] at rows [1]"]),
    "uint64 seed above int64": ({"a": {"prompt": ["x", "y"], "seed": pa.array([5, 2**63 + 5], pa.uint64())}},
                                ["1 seed value(s) outside", "[9223372036854775813] at rows [1]"]),
    "NFC and NFD spellings of one id": ({"a": {"prompt": ["x", "y"], "prompt_id": ["caf\u00e9", "cafe\u0301"]}},
                                        ["1 duplicate prompt_id", "caf\u00e9"]),
}


@pytest.mark.parametrize("files, fragments", HOSTILE_INPUTS.values(), ids=HOSTILE_INPUTS.keys())
def test_hostile_inputs_exit_2_in_one_line_before_ray(tmp_path, capsys, files, fragments):
    import ray

    from jobs.cli import main

    for name, content in files.items():
        path = tmp_path / "in" / f"{name}.parquet"
        if isinstance(content, dict):
            write(path, **content)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            content(path)
    assert main(["generate", "--prompts", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert all(fragment in err for fragment in fragments), err
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


def test_run_num_images_has_the_same_bound(tmp_path, capsys):
    from jobs.cli import main

    write(tmp_path / "p.parquet", prompt=["x"])
    assert main(["generate", "--prompts", str(tmp_path / "p.parquet"), "--out", str(tmp_path / "out"),
                 "--num-images", "10001"]) == 2
    assert "--num-images 10001 is outside [1, 10000]" in capsys.readouterr().err


def test_edge_values_are_accepted(tmp_path):
    write(tmp_path / "p.parquet", prompt=["x", "y", "z"], seed=pa.array([0, 2**63 - 2, None], pa.uint64()),
          num_images=[10_000, 2, None])
    assert scan(tmp_path / "p.parquet", num_images=10_000).samples == 20_002
    write(tmp_path / "q.parquet", prompt=["x", "y"], seed=[0, 2**63 - 2], num_images=[1, 3])
    with pytest.raises(PromptInputError, match=r"q.parquet: seed \+ num_images - 1 passes 2\^63-1 at rows \[1\]"):
        scan(tmp_path / "q.parquet")  # its third sample would reuse seed 0's


def test_hidden_and_underscore_names_count_only_below_the_given_folder(tmp_path):
    root = tmp_path / ".cache" / "_prompts"  # as ~/.cache/prompts/: hidden parents are the user's choice
    write(root / "a.parquet", prompt=["x"])
    write(root / "part" / "b.parquet", prompt=["y"])
    write(root / "_temporary" / "c.parquet", prompt=["z"])  # skipped below the root: a writer's leftovers
    write(root / ".hidden.parquet", prompt=["z"])
    (root / "_SUCCESS").write_bytes(b"")
    assert scan(root).files == [str(root / "a.parquet"), str(root / "part" / "b.parquet")]
    assert read_prompts(str(root)) == ["x", "y"]  # the prompt-set reader of sample/quantize/evaluate too


def test_prompt_ids_are_nfc():
    nfd = "cafe\u0301"
    table = pa.table({"prompt": ["x"], "prompt_id": [nfd]})
    assert list(prompt_ids(table)) == ["caf\u00e9"]
    rows = expand_samples({"prompt": np.array(["x"], dtype=object), "prompt_id": np.array([nfd], dtype=object)},
                          run_seed=0, num_images=1)
    assert list(rows["prompt_id"]) == ["caf\u00e9"]  # the id that names the output files


def test_derived_ids_are_stable_and_content_keyed():
    table = pa.table({"prompt": ["a", "a", "b"], "seed": [1, 2, 1]})
    ids = prompt_ids(table)
    assert len(set(ids)) == 3
    assert list(prompt_ids(table.take([2, 0, 1]))) == [ids[2], ids[0], ids[1]]  # order does not matter
    assert list(prompt_ids(pa.table({"prompt": ["a"], "prompt_id": [7]}))) == ["7"]


def test_expand_samples_seeds_and_carried_columns():
    batch = {"prompt": np.array(["a", "b"], dtype=object), "prompt_id": np.array(["p", "q"], dtype=object),
             "seed": np.array([10.0, np.nan]), "num_images": np.array([2, np.nan])}
    rows = expand_samples(batch, run_seed=0, num_images=3)
    assert list(zip(rows["prompt_id"], rows["sample_idx"])) == [("p", 0), ("p", 1), ("q", 0), ("q", 1), ("q", 2)]
    assert list(rows["seed"][:2]) == [10, 11]  # a given seed: seed + sample index
    other_run = expand_samples(batch, run_seed=1, num_images=3)
    assert rows["seed"][2] != other_run["seed"][2]  # derived seeds follow the run seed
    assert list(rows["seed"][2:]) == list(expand_samples(batch, run_seed=0, num_images=3)["seed"][2:])
    sharded = expand_samples({**batch, "shard": np.array(["s1", "s2"], dtype=object)}, run_seed=0, num_images=3)
    assert list(sharded["shard"]) == ["s1", "s1", "s2", "s2", "s2"]  # bookkeeping columns follow their row


# ---------------------------------------------------------------------------------------------------
# names, config hash


@pytest.mark.parametrize("prompt_id", ["../x", "a/b", "/etc/passwd", "..", "", "a\\b", "ü ñ", "x" * 300])
def test_image_names_never_escape(prompt_id):
    name = image_name(prompt_id, 3, "png")
    assert "/" not in name and "\\" not in name and not name.startswith(".") and len(name) < 130
    assert name.endswith("_3.png")


def test_distinct_ids_get_distinct_names():
    assert len({image_name(p, 0, "png") for p in ["a/b", "a-b", "a b", "a?b"]}) == 4


def test_every_job_option_declares_whether_it_is_hashed():
    assert set(HASHED_OPTIONS) | set(UNHASHED_OPTIONS) | set(CURATION_OPTIONS) == set(JobOptions.model_fields)
    assert not set(HASHED_OPTIONS) & set(UNHASHED_OPTIONS) and not set(CURATION_OPTIONS) & set(HASHED_OPTIONS)
    assert not set(CURATION_OPTIONS) & set(UNHASHED_OPTIONS)
    assert all(JobOptions.model_fields[name].default == default for name, default in CURATION_OPTIONS.items())
    for name, field in JobOptions.model_fields.items():
        assert field.description, name


@pytest.mark.parametrize("cpus, job, generator_cpus, scorer_cpus", [
    (2, {}, 0.5, None),  # one generator, no scorer
    (2, {"scorer": "clip"}, 0.5, 0.5),
    # two generators and a scorer at 0.5 each would leave 0.5 CPU: the read task (1 CPU) never started
    (2, {"scorer": "clip", "generator_actors": 2}, 1 / 3, 1 / 3),
    (16, {"scorer": "clip"}, 1.0, 1.0),
])
def test_unset_cpu_shares_leave_a_cpu_for_reads_and_writes(cpus, job, generator_cpus, scorer_cpus):
    generator, scorer = plan_stages(GenerateConfig(job=job), {"CPU": float(cpus)})
    assert generator.num_cpus == pytest.approx(generator_cpus)
    assert (scorer and scorer.num_cpus) == (scorer_cpus and pytest.approx(scorer_cpus))
    assert generator.actors * generator.num_cpus + (scorer.num_cpus if scorer else 0) <= cpus - 1


def test_cpu_shares_that_starve_reads_are_refused_with_the_flags_to_change():
    config = GenerateConfig(job={"generator_actors": 2, "generator_cpus": 0.5, "scorer": "clip"})
    with pytest.raises(ValueError, match="reserve 1.5 of the cluster's 2 CPUs.*lower --generator-cpus"):
        plan_stages(config, {"CPU": 2.0})


def test_config_hash_covers_pixels_not_placement():
    base = GenerateConfig()
    assert GenerateConfig(job={"batch_size": 9, "out": "elsewhere"}, model={"device": "cpu"}).config_hash() == \
        base.config_hash()
    for change in ({"job": {"seed": 1}}, {"generation": {"steps": 3}}, {"model": {"dtype": "bf16"}},
                   {"job": {"image_format": "webp"}}):
        assert GenerateConfig.model_validate(change).config_hash() != base.config_hash(), change


# ---------------------------------------------------------------------------------------------------
# stage classes on dict batches, the sink on a local folder


@pytest.fixture(scope="module")
def generator():
    from actors.generator import Generator

    return Generator({"model": "tiny-meissonic", "device": "cpu"}, SETTINGS)


def test_generator_rows_in_image_rows_out(generator):
    batch = {"prompt": np.array(["a", "b"], dtype=object), "seed": np.array([1, 2]),
             "prompt_id": np.array(["p", "q"], dtype=object)}
    out = generator(batch)
    assert list(out["prompt_id"]) == ["p", "q"] and list(out["error"]) == ["", ""]
    assert out["nfe"].tolist() == [2, 2] and (out["gen_seconds"] > 0).all()
    images = [Image.open(io.BytesIO(b)) for b in out["image"]]
    assert [(i.format, i.size) for i in images] == [("PNG", (32, 32))] * 2
    alone = generator({"prompt": np.array(["b"], dtype=object), "seed": np.array([2])})
    assert alone["image"][0] == out["image"][1]  # per-sample seeds: batch-mates do not matter


def test_generator_bad_row_is_data_unless_fail_fast(generator, monkeypatch):
    real = generator.pipe.generate

    def flaky(prompts, seeds, **kwargs):
        if "boom" in prompts:
            raise RuntimeError("model crashed")
        return real(prompts, seeds, **kwargs)

    monkeypatch.setattr(generator.pipe, "generate", flaky)
    batch = {"prompt": np.array(["ok", "boom"], dtype=object), "seed": np.array([1, 2])}
    out = generator(batch)
    assert out["error"][0] == "" and len(out["image"][0]) > 0
    assert out["error"][1] == "RuntimeError: model crashed (prompt: 'boom')" and out["image"][1] == b""
    monkeypatch.setattr(generator, "fail_fast", True)
    with pytest.raises(RuntimeError, match="model crashed"):
        generator(batch)


def test_scoring_stage_with_tiny_hps(generator, fixtures_dir):
    from actors.scoring_stage import ScoringStage

    hps = fixtures_dir / "hps-tiny"
    stage = ScoringStage({"name": "hps-v2", "checkpoint": str(hps / "hps_tiny_checkpoint.pt"),
                          "model": str(hps / "model_config.json"), "device": "cpu"})
    rows = generator({"prompt": np.array(["a", "b"], dtype=object), "seed": np.array([1, 2])})
    rows["error"] = np.array(["", "RuntimeError: upstream"], dtype=object)
    rows["image"][1] = b""
    out = stage(rows)
    assert np.isfinite(out["score"][0]) and np.isnan(out["score"][1])
    assert list(out["error"]) == ["", "RuntimeError: upstream"]


def test_sink_keeps_escaping_ids_inside_out(tmp_path, generator):
    out = tmp_path / "out"
    batch = generator({"prompt": np.array(["a", "b", "c"], dtype=object), "seed": np.array([1, 2, 3])})
    batch.update(prompt_id=np.array(["../x", "a/b", "../../etc/passwd", "failed"], dtype=object),
                 sample_idx=np.array([0, 1, 0, 0]), negative_prompt=np.array(["", "", "", ""], dtype=object))
    for column, value in (("prompt", "d"), ("seed", 4), ("image", b""), ("nfe", 0), ("gen_seconds", 0.1),
                          ("error", "RuntimeError: boom")):  # a failed row: recorded, no image file
        batch[column] = np.append(batch[column], np.array([value], dtype=batch[column].dtype))
    run = {"model": "tiny-meissonic", "quantization": "fp32", "sampler": "{}", "sampler_hash": "h",
           "config_hash": "c", "scorer": None, "attempt": 0}
    sink = SampleSink(Storage(str(out)), run, "png", layout="both")
    table = pa.table({k: list(v) for k, v in batch.items()})
    table = table.append_column("shard", pa.array(["s0"] * 4)).append_column("shard_samples", pa.array([4] * 4))
    assert sink.write_table(table) == ["s0"]
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert all(p.startswith("out/") for p in written)
    assert len([p for p in written if p.startswith("out/images/")]) == 3
    metrics = pq.read_table(out / "_shards" / "s0.parquet")
    assert sorted(metrics["prompt_id"].to_pylist()) == ["../../etc/passwd", "../x", "a/b", "failed"]
    uris = dict(zip(metrics["prompt_id"].to_pylist(), metrics["image_uri"].to_pylist()))
    errors = dict(zip(metrics["prompt_id"].to_pylist(), metrics["error"].to_pylist()))
    assert uris.pop("failed") is None and errors.pop("failed") == "RuntimeError: boom"
    assert all(os.path.isfile(u) for u in uris.values()) and set(errors.values()) == {None}
    with tarfile.open(out / "webdataset" / "s0.tar") as tar:
        assert len([m for m in tar.getnames() if m.endswith(".png")]) == 3
