"""``describe_validation_error``: one line naming each bad key as the user spelled it, its problem and value."""

import pytest
from pydantic import BaseModel, Field, ValidationError, model_validator

from jobs.cli_args import build_model
from mgt.validation import describe_validation_error


class Settings(BaseModel):
    steps: int = Field(4, ge=1)
    width: int = 64
    height: int = 64

    @model_validator(mode="after")
    def _square(self):
        if self.width != self.height:
            raise ValueError(f"width {self.width} != height {self.height}")
        return self


def error_of(values: dict) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        Settings.model_validate(values)
    return info.value


def test_each_field_problem_names_key_problem_and_value():
    message = describe_validation_error(error_of({"steps": 0, "width": "wide"}))
    assert message == ("steps: Input should be greater than or equal to 1 (got 0); width: Input should be a "
                       "valid integer, unable to parse string as an integer (got 'wide')")
    assert "\n" not in message


def test_keys_are_spelled_as_the_user_wrote_them():
    message = describe_validation_error(error_of({"steps": 0}), lambda key: f"--{key} / {key}")
    assert message == "--steps / steps: Input should be greater than or equal to 1 (got 0)"


def test_a_cross_field_problem_is_its_message_without_the_whole_input():
    assert describe_validation_error(error_of({"width": 32})) == "Value error, width 32 != height 64"


def test_cli_errors_use_it_with_flag_names():
    import argparse

    with pytest.raises(ValueError) as info:
        build_model(Settings, {"width": 32}, argparse.Namespace(steps=0), source="options")
    assert str(info.value) == "invalid options: --steps / steps: Input should be greater than or equal to 1 (got 0)"
