"""The `compile` model option: flags and config files, the config hash, what it compiles, and eager parity."""

import argparse

import pytest
import torch
import yaml

import mgt
from jobs.cli_args import add_model_arguments, build_model, load_config_file
from jobs.serve.config import ServeConfig
from mgt.config import ModelConfig
from mgt.efficient import options as efficient
from mgt.efficient.tome import TomeMGT
from mgt.models.amused import tiny_amused_transformer
from mgt.models.meissonic import tiny_meissonic_transformer
from pipeline.config import GenerateConfig


def parse_model(argv: list[str], file_values: dict | None = None) -> ModelConfig:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser, ModelConfig, "model")
    return build_model(ModelConfig, file_values or {}, parser.parse_args(argv))


def test_compile_is_a_flag_a_yaml_key_and_a_serve_field(tmp_path):
    assert ModelConfig().compile is False
    assert parse_model(["--compile"]).compile is True
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"compile": True}))
    assert parse_model([], load_config_file(str(path))).compile is True
    assert parse_model(["--no-compile"], load_config_file(str(path))).compile is False  # the flag wins
    assert ServeConfig.model_validate({"model": {"model": "tiny-meissonic", "compile": True}}).model.compile is True


def test_compile_does_not_change_the_config_hash():
    """Same blocks, same math: like the device, compile changes speed, not the model (see pipeline/config.py)."""
    assert (GenerateConfig(model={"compile": True}).config_hash() == GenerateConfig().config_hash())


def test_compile_with_quant_is_refused_naming_both_options():
    with pytest.raises(ValueError, match="drop --compile or --quant"):
        ModelConfig(compile=True, quant="w8a16")
    with pytest.raises(ValueError, match="compile cannot be combined with quant='w4a8'"):
        mgt.load_pipeline("tiny-meissonic", device="cpu", quant="w4a8", compile=True)


def test_every_repeated_block_is_compiled_except_tome_patched_ones():
    torch.manual_seed(0)
    meissonic = tiny_meissonic_transformer(downsample=True, layers=2, single_layers=2)
    assert efficient.apply_compile(meissonic) == ["transformer_blocks.0", "transformer_blocks.1",
                                                  "single_transformer_blocks.0", "single_transformer_blocks.1"]
    merged = tiny_meissonic_transformer(downsample=True, layers=2, single_layers=2)
    TomeMGT(0.25).apply(merged)
    assert efficient.apply_compile(merged) == ["single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert efficient.apply_compile(tiny_amused_transformer()) == ["transformer_layers.0"]
    with pytest.raises(ValueError, match="no block to compile"):
        efficient.apply_compile(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_compile_mode_suits_the_device():
    assert efficient.compile_mode(torch.device("cuda")) == "max-autotune-no-cudagraphs"
    assert efficient.compile_mode(torch.device("cpu")) == "default"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-meissonic", "tiny-amused"])
def test_compiled_pipeline_gives_eager_tokens_and_stays_batch_invariant(name):
    """Tokens equal eager's, alone and in a batch (micro_batch=1); one forward's logits agree within 1e-5."""
    eager = mgt.load_pipeline(name, device="cpu")
    compiled = mgt.load_pipeline(name, device="cpu", compile=True)
    prompts, seeds = ["a red circle", "a blue square", ""], [0, 1, 2]
    expected = eager.generate(prompts, seeds, steps=4, decode=False).tokens
    assert torch.equal(compiled.generate(prompts, seeds, steps=4, decode=False).tokens, expected)
    assert torch.equal(compiled.generate(prompts[1:2], seeds[1:2], steps=4, decode=False).tokens, expected[1:2])

    conditioning = eager.conditioner.condition(["a red circle", "a blue square"], 128, 128, eager.transformer.dtype,
                                               eager.device)
    tokens = torch.randint(0, eager.mask_token_id + 1, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    inputs = (tokens, *conditioning, torch.tensor([3]))
    with torch.inference_mode():
        torch.testing.assert_close(compiled.transformer(*inputs), eager.transformer(*inputs), rtol=0, atol=1e-5)
