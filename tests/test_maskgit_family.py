"""MaskGIT as a model family: its pipeline is token-exact with the reference's v1.0 confidence sampler, prompts are
ImageNet classes, and the engine's techniques, Halton order and editing run on it (tiny-maskgit)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from maskgit_helpers import reference_transformer
from PIL import Image
from safetensors.torch import load_file

from mgt.editing import Edit
from mgt.models.class_labels import check_class_prompts, class_index
from mgt.models.maskgit import MASKGIT
from mgt.models.tiny import tiny_vqvae, write_model
from mgt.pipeline import load_pipeline
from mgt.sampling.sampler_config import PRESETS, SamplerConfig

V1_RUNS = ["confidence-v1.0-seed1", "confidence-v1.0-seed42", "confidence-v1.0-nocfg-seed9",
           "confidence-v1.0-maskboost-seed3"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["maskgit-tiny-256style", "maskgit-tiny-512style"])
def reference_model(request, fixtures_dir, tmp_path_factory):
    """(a hub-layout folder holding the fixture's reference weights, the recorded runs, the recorded tokens)."""
    source = fixtures_dir / request.param
    model, config = reference_transformer(source, dropout=0.0)
    folder = tmp_path_factory.mktemp(request.param)
    write_model(folder, model, tiny_vqvae(codebook=config["transformer"]["codebook_size"]), MASKGIT)
    return folder, config["runs"], load_file(source / "reference_samples.safetensors")


@pytest.mark.parametrize("name", V1_RUNS)
def test_pipeline_tokens_equal_the_reference_confidence_sampler(reference_model, name):
    folder, runs, recorded = reference_model
    run = runs[name]
    pipe = load_pipeline(folder)
    if run["mask_logit_boost"]:  # the mask token is drawn often: it must count as known, as in the reference
        with torch.no_grad():
            pipe.transformer.bias[:, pipe.transformer.mask_token_id] += run["mask_logit_boost"]
    settings = run["settings"]
    if settings["w"]:  # the README's settings: the family's defaults, nothing passed
        assert (pipe.defaults.steps, pipe.defaults.guidance) == (settings["step"], pytest.approx(1 + settings["w"]))
        out = pipe.generate([str(run["label"])], [run["seed"]], decode=False)
    else:
        sampler = SamplerConfig(gumbel_temperature=(settings["r_temp"], 0.0), softmax_temperature=settings["sm_temp"])
        out = pipe.generate([str(run["label"])], [run["seed"]], guidance=1.0, sampler=sampler, decode=False)
    assert torch.equal(out.tokens, recorded[name]), f"{name}: {(out.tokens != recorded[name]).sum()} tokens differ"


def test_class_prompts_resolve_by_index_and_name_and_refuse_the_rest():
    assert class_index("207") == class_index("Golden Retriever") == 207 and class_index("") is None
    with pytest.raises(ValueError, match="closest: 'golden retriever'"):
        class_index("golden retreiver")
    with pytest.raises(ValueError, match="out of range"):
        class_index("1000")
    with pytest.raises(ValueError, match="takes none"):
        check_class_prompts(["207"], "blurry")


def test_tiny_maskgit_generates_images_and_refuses_negative_prompts(tiny_maskgit):
    out = tiny_maskgit.generate(["golden retriever", "1", ""], [1, 2, 3])
    assert out.images.shape == (3, 64, 64, 3) and out.nfe == 8 and out.tokens.max() < 64
    with pytest.raises(ValueError, match="takes none"):
        tiny_maskgit.generate(["golden retriever"], [1], negative_prompts="blurry")
    with pytest.raises(ValueError, match="no ImageNet class"):
        tiny_maskgit.generate(["a dog on a beach"], [1])


@pytest.mark.parametrize("preset", [*PRESETS, "vanilla:order=halton",
                                    "zsampling+noise:order=halton"])
def test_every_preset_runs_on_maskgit_batch_invariant(tiny_maskgit, preset):
    prompts, seeds, steps = ["golden retriever", "", "tench"], [3, 4, 5], 5
    sampler = SamplerConfig.from_spec(preset)
    batch = tiny_maskgit.generate(prompts, seeds, steps=steps, sampler=sampler, decode=False)
    assert batch.nfe == (3 * steps - 2 if "zsampling" in preset or preset == "all" else steps)
    assert batch.tokens.max() < 64
    alone = tiny_maskgit.generate(prompts[2:], seeds[2:], steps=steps, sampler=sampler, decode=False)
    assert torch.equal(alone.tokens[0], batch.tokens[2])
    if preset != "vanilla":
        vanilla = tiny_maskgit.generate(prompts, seeds, steps=steps, decode=False)
        assert not torch.equal(vanilla.tokens, batch.tokens)


def test_cached_context_is_refused_with_the_halton_order(tiny_maskgit):
    with pytest.raises(ValueError, match="halton"):
        tiny_maskgit.generate(["tench"], [1], steps=5, sampler=SamplerConfig.from_spec("recap:order=halton"),
                              decode=False)


def test_editing_on_the_token_grid_keeps_the_unmasked_codes(tiny_maskgit):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    inpaint = Edit(image=image, mask=Image.fromarray(mask))
    img2img = Edit(image=image, strength=0.5)
    out = tiny_maskgit.generate(["golden retriever", "tench"], [1, 2], edits=[inpaint, img2img])
    from mgt.editing import image_tokens

    source = image_tokens(tiny_maskgit.vqvae, [image], MASKGIT)[0]
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[4:12, 4:12] = False
    assert torch.equal(out.tokens[0][outside], source[outside])
    assert not torch.equal(out.tokens[0][~outside], source[~outside])
    assert out.images.shape == (2, 64, 64, 3)


def test_weight_only_quantization_runs_and_the_rest_is_refused_in_one_line(tiny_maskgit):
    quantized = load_pipeline("tiny-maskgit", quant="w8a16")
    out = quantized.generate(["tench"], [1], decode=False)
    assert out.tokens.shape == (1, 16, 16) and out.tokens.max() < 64
    with pytest.raises(ValueError, match="use a weight-only preset"):
        load_pipeline("tiny-maskgit", quant="w8a8")
    with pytest.raises(ValueError, match="TomeMGT needs a Meissonic transformer"):
        load_pipeline("tiny-maskgit", tome=0.5)


def test_cli_sample_writes_the_class_image(tmp_path):
    from jobs.cli import main

    assert main(["sample", "--model", "tiny-maskgit", "--prompt", "golden retriever", "--out", str(tmp_path)]) == 0
    (image,) = tmp_path.glob("*.png")
    assert Image.open(image).size == (64, 64) and "golden-retriever" in image.name


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_unknown_classes_and_negative_prompts_are_refused_before_ray(tmp_path, capsys, command):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from jobs.cli import main

    prompts = tmp_path / "classes.parquet"
    pq.write_table(pa.table({"prompt": ["golden retriever", "hot dgo"]}), prompts)
    extra = ["--scorer", "clip"] if command == "evaluate" else []
    args = [command, "--model", "tiny-maskgit", "--prompts", str(prompts), "--out", str(tmp_path / "out"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "'hot dgo' is no ImageNet class" in err and "closest: 'hotdog'" in err, err
    pq.write_table(pa.table({"prompt": ["tench"]}), prompts)
    assert main([*args, "--negative-prompt", "blurry"]) == 2
    assert "takes none" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "out" / "runs").exists()


def test_outpainting_extends_the_image_to_the_models_grid(tiny_maskgit, tmp_path):
    from mgt.editing import EditOptions, image_tokens

    source = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8))
    source.save(tmp_path / "narrow.png")
    edit = EditOptions(init_image=str(tmp_path / "narrow.png"), outpaint=(16, 0, 0, 0)).load(
        tiny_maskgit.vae_scale_factor)
    out = tiny_maskgit.generate(["volcano"], [4], edits=[edit])
    assert out.images.shape == (1, 64, 64, 3)
    kept = ~torch.from_numpy(np.asarray(edit.mask.resize((16, 16), Image.NEAREST)) > 127)
    assert 0 < kept.sum() < 256
    assert torch.equal(out.tokens[0][kept], image_tokens(tiny_maskgit.vqvae, [edit.image], MASKGIT)[0][kept])


def test_released_checkpoint_layouts_load_into_a_hub_folder(fixtures_dir, tmp_path):
    """The trainer's ``.pth`` (DDP-prefixed keys inside ``model_state_dict``) and Lightning's ``last.ckpt`` (with its
    training loss), read with ``weights_only=True``, become a folder that loads as the maskgit family."""
    from mgt.models.maskgit import write_released_model

    source = fixtures_dir / "maskgit-tiny-256style"
    ref = json.loads((source / "config.json").read_text())["transformer"]
    state = load_file(source / "transformer.safetensors")
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()}, "iter": 3}, tmp_path / "m.pth")
    vq_folder = fixtures_dir / "maskgit-tiny-vqgan"
    vq = json.loads((vq_folder / "config.json").read_text())
    vq_state = {k: v.float() for k, v in load_file(vq_folder / "vqgan.safetensors").items()}
    torch.save({"state_dict": {**vq_state, "loss.logvar": torch.zeros(())}, "global_step": 7}, tmp_path / "last.ckpt")
    config = dict(hidden_dim=ref["hidden_dim"], codebook_size=ref["codebook_size"], depth=ref["depth"],
                  heads=ref["heads"], mlp_dim=ref["mlp_dim"], num_classes=ref["nclass"])
    write_released_model(tmp_path / "model", tmp_path / "m.pth", tmp_path / "last.ckpt", ref["f_factor"], config,
                         {key: vq[key] for key in ("ddconfig", "n_embed", "embed_dim")})
    pipe = load_pipeline(tmp_path / "model")
    assert pipe.family == "maskgit" and pipe.defaults.steps == 8
    assert torch.equal(pipe.transformer.bias, state["bias"])
    out = pipe.generate(["3"], [1])
    assert out.images.shape[1:] == (16 * pipe.vae_scale_factor,) * 2 + (3,)
