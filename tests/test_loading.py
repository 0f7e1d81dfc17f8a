"""Model loading: registered names, local folders, variants, the hub cache (offline) and S3 (moto)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mgt
from mgt.hub.loading import ModelLoadError, resolve_model_path


@pytest.fixture(scope="module")
def tiny_folder():
    return resolve_model_path("tiny-meissonic")


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_registered_name_is_built_once(tiny_folder):
    marker = tiny_folder / ".maskray-complete"
    assert marker.exists()
    before = marker.stat().st_mtime_ns
    assert resolve_model_path("tiny-meissonic") == tiny_folder
    assert marker.stat().st_mtime_ns == before
    for sub in ("transformer", "vqvae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_folder / sub).is_dir()
    assert json.loads((tiny_folder / "transformer" / "config.json").read_text())["_class_name"] == "Transformer2DModel"


def test_local_folder_loads_like_the_name(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "m")
    a = mgt.load_pipeline(str(folder), device="cpu").generate(["x"], [0], steps=3, decode=False)
    b = mgt.load_pipeline("tiny-meissonic", device="cpu").generate(["x"], [0], steps=3, decode=False)
    assert torch.equal(a.tokens, b.tokens)


def test_fp16_variant(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "m")
    for sub, stem in (("transformer", "diffusion_pytorch_model"), ("vqvae", "diffusion_pytorch_model"),
                      ("text_encoder", "model")):
        weights = load_file(str(folder / sub / f"{stem}.safetensors"))
        save_file({k: v.half() for k, v in weights.items()}, str(folder / sub / f"{stem}.fp16.safetensors"),
                  metadata={"format": "pt"})
    pipe = mgt.load_pipeline(str(folder), dtype="fp16", device="cpu", variant="fp16")
    assert pipe.transformer.dtype == torch.float16
    out = pipe.generate(["x"], [0], steps=2)
    assert out.images.shape == (1, 64, 64, 3)
    (folder / "vqvae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights diffusion_pytorch_model.fp16.safetensors in .*vqvae"):
        mgt.load_pipeline(str(folder), device="cpu", variant="fp16")


def test_missing_subfolder_names_it(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "m")
    shutil.rmtree(folder / "vqvae")
    with pytest.raises(ModelLoadError, match=r"missing subfolder .*vqvae"):
        mgt.load_pipeline(str(folder), device="cpu")


def test_config_weights_mismatch_is_one_clear_error(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "m")
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_layers"] = 2
    config["codebook_size"] = 32
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as info:
        mgt.load_transformer(str(folder))
    text = str(info.value)
    assert str(folder / "transformer") in text
    assert "missing transformer_blocks.1." in text and "shape mismatch mlm_layer.conv2.weight" in text


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="transformer/config.json"):
        mgt.load_pipeline(str(tmp_path), device="cpu")


def test_unknown_hub_id_offline_names_the_fix():
    with pytest.raises(ModelLoadError, match=r"'nobody/no-model' is not in the local hub cache .*HF_HUB_OFFLINE=1"):
        mgt.load_pipeline("nobody/no-model", device="cpu")


def test_hub_id_resolves_from_the_offline_cache(tiny_folder, tmp_path, monkeypatch):
    """A hub id found in the hub cache loads with no network (HF_HUB_OFFLINE=1, as on an air-gapped node)."""
    monkeypatch.setenv("MASKRAY_CACHE", str(tmp_path))
    repo = tmp_path / "hub" / "models--MeissonFlow--Tiny"
    revision = "0" * 40
    copy_model(tiny_folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    pipe = mgt.load_pipeline("MeissonFlow/Tiny", device="cpu")
    assert pipe.family == "meissonic"


@pytest.mark.parametrize("device,message", [("tpu", "unknown device|unsupported device"), ("cuda:0", "no CUDA")])
def test_bad_device(device, message):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match=message):
        mgt.load_transformer("tiny-meissonic", device=device)


def test_bad_dtype():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        mgt.load_transformer("tiny-meissonic", dtype="fp8")


@pytest.fixture
def models_bucket(tmp_path, s3_env, monkeypatch):
    """Bucket ``models`` on the test's S3 server (reached through the AWS_* variables) and a fresh model cache."""
    import s3fs

    monkeypatch.setenv("MASKRAY_CACHE", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem(**s3_env)
    fs.mkdir("models")
    return fs


def test_s3_uri_is_downloaded_once(tiny_folder, models_bucket):
    fs = models_bucket
    fs.put(str(tiny_folder) + "/", "models/tiny/", recursive=True)
    first = mgt.load_pipeline("s3://models/tiny", device="cpu").generate(["x"], [0], steps=2, decode=False)
    fs.rm("models/tiny", recursive=True)  # the second load must come from the local cache
    second = mgt.load_pipeline("s3://models/tiny", device="cpu").generate(["x"], [0], steps=2, decode=False)
    assert torch.equal(first.tokens, second.tokens)
    with pytest.raises(ModelLoadError, match="does not exist"):
        mgt.load_pipeline("s3://models/other", device="cpu")


def test_s3_model_with_a_key_that_leaves_the_cache_is_a_load_error(tiny_folder, tmp_path, models_bucket):
    fs = models_bucket
    fs.put(str(tiny_folder) + "/", "models/evil/", recursive=True)
    fs.pipe("models/evil/../escape.bin", b"payload")  # S3 keeps the key verbatim
    with pytest.raises(ModelLoadError, match="would leave the local cache folder"):
        mgt.load_pipeline("s3://models/evil", device="cpu")
    assert not list(tmp_path.rglob("escape.bin"))
