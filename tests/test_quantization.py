"""SCQ and the quantization presets (arXiv 2411.10781 §4) on the tiny Meissonic: layers, scales, accuracy,
checkpoints, the ``maskray quantize`` CLI and generation with quantization + TomeMGT."""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from optimum.quanto import freeze, qint4, qint8

import mgt
import mgt.models.meissonic
from mgt.efficient import quantization, scq
from mgt.efficient.quant_config import PRESETS, SCQConfig
from mgt.efficient.quantized_checkpoint import load_quantized, save_quantized

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle above a blue square", "a green triangle"]
# Fast calibration: 2 prompts x 2 masked views, 4-step self-distillation generations.
FAST = SCQConfig(views_per_prompt=2, generation_steps=4, qat_accumulation=2)


@pytest.fixture(scope="module")
def pipe():
    return mgt.load_pipeline("tiny-meissonic", device="cpu")


@pytest.fixture(scope="module")
def batches(pipe):
    """Held-out evaluation batches (other prompts and seed than calibration)."""
    config = SCQConfig(views_per_prompt=2, generation_steps=4, seed=7)
    return scq.self_distillation_batches(pipe, ["a photo of a cat", "a house by a lake"], config)


@pytest.fixture(scope="module")
def calibration(pipe):
    return scq.self_distillation_batches(pipe, PROMPTS, FAST)


@pytest.fixture(scope="module")
def quantized(pipe, calibration):
    """preset -> (quantized copy of the tiny transformer, SCQReport)."""
    out = {}
    for preset in PRESETS:
        model = copy.deepcopy(pipe.transformer)
        out[preset] = (model, scq.apply_preset(model, preset, calibration, FAST))
    return out


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_linear_is_quantized(pipe, quantized, preset):
    names = quantization.linear_names(pipe.transformer)
    model = quantized[preset][0]
    spec = PRESETS[preset]
    assert quantization.linear_names(model) == names and len(names) > 20
    for name in names:
        module = model.get_submodule(name)
        assert isinstance(module, quantization.MGTQLinear) and module.frozen, name
        assert module.weight_qtype == {"qint8": qint8, "qint4": qint4}[spec.weights], name
        assert isinstance(module, quantization.CFGQLinear) == spec.activations, name
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.dtype == torch.float32 for m in convs)  # convolutions stay in full precision


def test_w4a8_scales_are_per_cfg_half(quantized):
    scales = quantization.activation_scales(quantized["w4a8"][0])
    assert scales and all(s.shape == (2, 1) for s in scales.values())
    assert all(bool((s > 0).all() and (s != 1).all()) for s in scales.values())  # every layer was calibrated
    # Text projections see [negative prompt ; prompt]: the halves differ.
    assert not torch.equal(*scales["context_embedder"])
    # The timestep embedding is one row shared by both halves: both scales see it.
    assert torch.equal(*scales["time_text_embed.timestep_embedder.linear_1"])


def test_secondary_calibration_changes_scales(pipe, calibration):
    """Calibration #2 re-estimates the scales on the fine-tuned weights; without QAT it reproduces #1."""
    results = {}
    for steps in (0, 2):
        model = copy.deepcopy(pipe.transformer)
        report = scq.apply_preset(model, "scq", calibration, FAST.model_copy(update=dict(qat_steps=steps, qat_lr=1e-3)))
        results[steps] = (report, quantization.activation_scales(model))
    report, final = results[0]
    assert report.qat_steps == 0
    assert all(torch.allclose(final[k], report.first_scales[k], rtol=1e-5) for k in final)
    report, final = results[2]
    assert report.qat_steps == 2 and all(torch.isfinite(torch.tensor(report.qat_losses)))
    changed = [k for k in final if not torch.allclose(final[k], report.first_scales[k], rtol=1e-3)]
    assert len(changed) > len(final) // 2, f"only {changed} changed"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_quantized_logits_close_to_fp32(pipe, quantized, batches, preset, record_property):
    with torch.no_grad():
        reference = torch.cat([b.run(pipe.transformer) for b in batches])
        logits = torch.cat([b.run(quantized[preset][0]) for b in batches])
    cosine = torch.nn.functional.cosine_similarity(reference.flatten(1), logits.flatten(1)).mean().item()
    top1 = (reference.argmax(1) == logits.argmax(1)).float().mean().item()
    record_property("cosine", cosine)
    record_property("top1_agreement", top1)
    print(f"\n{preset}: cosine similarity {cosine:.5f}, top-1 token agreement {top1:.4f}")
    weights_8bit = PRESETS[preset].weights == "qint8"
    assert cosine > (0.999 if weights_8bit else 0.99)
    assert top1 > (0.95 if weights_8bit else 0.8)


@pytest.mark.parametrize("preset,where", [("w4a8", "local"), ("scq", "memory"), ("w8a16", "local")])
def test_save_load_round_trip_gives_identical_logits(quantized, batches, tmp_path, preset, where):
    model = quantized[preset][0]
    uri = str(tmp_path / preset) if where == "local" else f"memory://maskray-test/{preset}"
    save_quantized(model, uri, preset=preset, source_model="tiny-meissonic")
    loaded = load_quantized(uri)
    assert type(loaded.get_submodule("context_embedder")) is type(model.get_submodule("context_embedder"))
    with torch.no_grad():
        for batch in batches[:2]:
            assert torch.equal(batch.run(model), batch.run(loaded))


def test_bf16_checkpoint_runs_under_inference_mode(batches, tmp_path):
    """bf16 int8 weights take quanto's CPU int8pack kernel, which needs aligned data, in the pipeline's mode."""
    model = mgt.load_transformer("tiny-meissonic", dtype="bf16", quant="w8a16")
    save_quantized(model, str(tmp_path / "bf16"), preset="w8a16", source_model="tiny-meissonic")
    loaded = load_quantized(str(tmp_path / "bf16"))
    batch = batches[0]
    args = (batch.token_ids, batch.encoder_hidden_states.bfloat16(), batch.pooled_projections.bfloat16(),
            batch.micro_conds.bfloat16(), batch.timestep)
    with torch.inference_mode():
        assert torch.equal(model(*args), loaded(*args))


def test_save_refuses_unfrozen_and_load_refuses_other_model(pipe, quantized, tmp_path):
    unfrozen = quantization.quantize_transformer(copy.deepcopy(pipe.transformer), "w8a16")
    with pytest.raises(ValueError, match="not frozen"):
        save_quantized(unfrozen, str(tmp_path / "x"), preset="w8a16", source_model="tiny-meissonic")
    save_quantized(quantized["w8a16"][0], str(tmp_path / "ok"), preset="w8a16", source_model="tiny-meissonic")
    with pytest.raises(mgt.hub.loading.ModelLoadError, match="--model tiny-meissonic"):
        mgt.load_pipeline("tiny-monetico", device="cpu", quant=str(tmp_path / "ok"))
    with pytest.raises(ValueError, match="w8a16, w4a16, w8a8, w4a8, scq"):
        mgt.load_pipeline("tiny-meissonic", device="cpu", quant="w3a8")


def test_loading_never_materialises_the_full_precision_transformer(tmp_path):
    """Peak RSS while loading a quantized checkpoint stays below the full-precision weight size."""
    torch.manual_seed(0)
    model = mgt.models.meissonic.MeissonicTransformer(num_layers=1, num_single_layers=2, attention_head_dim=128,
                                               num_attention_heads=8, joint_attention_dim=1024,
                                               pooled_projection_dim=1024, vocab_size=65, codebook_size=64)
    fp_bytes = sum(p.numel() * 4 for p in model.parameters())
    freeze(quantization.quantize_transformer(model, "w8a16"))
    save_quantized(model, str(tmp_path / "ck"), preset="w8a16", source_model="random")
    del model
    # VmHWM is the peak RSS of this process image; writing 5 to clear_refs resets it to the current RSS
    # (ru_maxrss would not do: Linux carries it over from the forking pytest process).
    script = textwrap.dedent(f"""
        import json
        import mgt.efficient.quantized_checkpoint as qc
        def status(key):
            line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
            return int(line.split()[1]) * 1024
        open("/proc/self/clear_refs", "w").write("5")
        before = status("VmRSS")
        model = qc.load_quantized({str(tmp_path / "ck")!r})
        print(json.dumps({{"increase": status("VmHWM") - before}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    increase = json.loads(result.stdout.strip().splitlines()[-1])["increase"]
    print(f"\npeak RSS increase while loading: {increase / 2**20:.0f} MiB; fp32 weights {fp_bytes / 2**20:.0f} MiB")
    assert increase < fp_bytes  # the file is mapped and unaligned tensors copied: ~2.5x the int8 weights


def test_quantize_cli_writes_a_checkpoint_used_by_sampling(tmp_path, capsys):
    """`maskray quantize` from a Parquet file, then generation with the checkpoint and TomeMGT."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.cli import main

    pq.write_table(pa.table({"prompt": PROMPTS, "other": [1, 2]}), tmp_path / "p.parquet")
    pq.write_table(pa.table({"words": PROMPTS}), tmp_path / "bad.parquet")
    out = tmp_path / "ck"
    common = ["--device", "cpu", "--generation-steps", "2", "--views-per-prompt", "2"]
    assert main(["quantize", "--preset", "w4a8", "--prompts", str(tmp_path / "bad.parquet"), "--out", str(out),
                 *common]) == 2
    assert "no prompt column; expected one of prompt, Prompt, Prompts, prompts, caption, text, found words" in \
        capsys.readouterr().err
    assert main(["quantize", "--preset", "w4a8", "--prompts", str(tmp_path / "p.parquet"), "--out", str(out),
                 *common]) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "quantization_map.json",
                                                "diffusion_pytorch_model.safetensors"}

    pipe = mgt.load_pipeline("tiny-meissonic", device="cpu", quant=str(out), tome=0.25)
    assert isinstance(pipe.transformer.context_embedder, quantization.CFGQLinear)
    prompts, seeds = ["a red circle", "a blue square", ""], [3, 4, 5]
    together = pipe.generate(prompts, seeds, steps=4)
    assert together.images.shape == (3, 64, 64, 3)
    alone = pipe.generate(prompts[1:2], seeds[1:2], steps=4)
    assert torch.equal(together.tokens[1], alone.tokens[0])  # batch invariance with quant + TomeMGT
    assert pipe.transformer.tome.last_lengths == [16 * 16 // 4 - 16]  # 8x8 grid after the down block, r = 16


def test_sample_flags_come_from_model_config():
    import argparse

    from jobs import sample_cmd

    parser = argparse.ArgumentParser()
    sample_cmd.add_arguments(parser)
    flags = {option for action in parser._actions for option in action.option_strings}
    assert {"--quant", "--tome", "--tome-reuse"} <= flags
