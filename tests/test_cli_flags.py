"""Flags generated from the typed configs: nested models are one flag parsed by the model itself."""

import argparse
import importlib

import pytest
from pydantic import BaseModel, ConfigDict, Field

from jobs.cli import COMMANDS
from jobs.cli_args import add_model_arguments
from mgt.config import GenerationSettings
from mgt.sampling.sampler_config import SamplerConfig


def command_parser(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"maskray {name}")
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    return parser


def help_of(parser: argparse.ArgumentParser, flag: str) -> str:
    return next(a.help for a in parser._actions if flag in a.option_strings)


def test_the_sampler_flag_is_generated_once_with_the_same_help_everywhere():
    description = GenerationSettings.model_fields["sampler"].description
    for name in ("sample", "generate"):
        assert help_of(command_parser(name), "--sampler").startswith(description), name


@pytest.mark.parametrize("name", ["sample", "generate"])
def test_the_sampler_flag_parses_by_from_spec(name):
    args = command_parser(name).parse_args(["--sampler", "zsampling+noise:noise.amplitude=1.5"])
    assert args.sampler == SamplerConfig.from_spec("zsampling+noise:noise.amplitude=1.5")
    assert command_parser(name).parse_args(["--sampler", '{"noise": {}}']).sampler.noise.amplitude == 2.0


def test_a_bad_spec_is_an_argparse_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as info:
        command_parser("sample").parse_args(["--sampler", "zigzag"])
    assert info.value.code == 2
    assert "argument --sampler: unknown sampler preset 'zigzag'" in capsys.readouterr().err


class Inner(BaseModel):
    """A nested config without from_spec."""

    model_config = ConfigDict(extra="forbid")
    size: int = Field(1, ge=1, description="A size.")


class Outer(BaseModel):
    """A config holding a nested one and a list."""

    model_config = ConfigDict(extra="forbid")
    inner: Inner | None = Field(None, description="The inner config.")
    names: list[str] = Field(default_factory=list, description="Names.")


def test_a_nested_model_without_from_spec_parses_json_and_lists_repeat(capsys):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser, Outer)
    args = parser.parse_args(["--inner", '{"size": 3}', "--names", "a", "--names", "b"])
    assert args.inner == Inner(size=3) and args.names == ["a", "b"]
    assert parser.parse_args(["--inner", "plain"]).inner == "plain"  # left to the enclosing model's validator
    with pytest.raises(SystemExit):
        parser.parse_args(["--inner", '{"size": 0}'])
    err = capsys.readouterr().err
    assert "argument --inner: invalid Inner: size: Input should be greater than or equal to 1" in err


def test_serve_scorer_accepts_a_name_or_json():
    from jobs.serve_cmd import build_config

    parser = command_parser("serve")
    assert build_config(parser.parse_args(["--scorer", "clip"])).scorer.name == "clip"
    assert build_config(parser.parse_args(["--scorer", '{"name": "hps-v2"}'])).scorer.name == "hps-v2"


@pytest.mark.parametrize("name", ["generate", "evaluate"])
def test_the_removed_webdataset_flag_and_key_name_their_replacement(name, tmp_path, capsys):
    from jobs.cli import main

    removed = "--webdataset was removed in maskray 0.1.0; use --layout both (files and WebDataset tars) or --layout"
    config = tmp_path / "old.yaml"
    config.write_text("webdataset: true\n")
    for argv in (["--webdataset"], ["--no-webdataset"], ["--config", str(config)]):
        assert main([name, *argv]) == 2, argv
        assert removed in capsys.readouterr().err, argv
    assert "--webdataset" not in command_parser(name).format_help()  # hidden: refused, never offered
