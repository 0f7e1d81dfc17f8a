"""Command-line flags generated from the pydantic config models, and YAML config files merged under them.

Every field of a config model becomes ``--field-name`` with the field's description as help, so help
text and defaults live only in the models; a nested model (the sampler, a scorer) is one flag parsed by
that model, as vLLM's ``EngineArgs`` does for its nested configs. Flags left unset do not override the
config file; the file does not override the models' defaults unless it names a key. Precedence: flag >
``--config`` file > model default.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from mgt.validation import describe_validation_error


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_model_arguments(parser: argparse.ArgumentParser, model: type[BaseModel], title: str | None = None,
                        skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of ``model``, its help the field's description and default.

    A ``Literal`` field gets choices, a ``bool`` ``--x/--no-x``, a list a repeatable flag, and a nested
    model one flag whose value that model parses itself (:func:`parse_model_flag`). An option the model lists in
    ``removed_options`` keeps a hidden flag, so that the model refuses it with its replacement.
    """
    group = parser.add_argument_group(title or model.__name__, (model.__doc__ or "").strip().splitlines()[0])
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        annotation = _strip_optional(field.annotation)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        default = field.get_default(call_default_factory=True)
        default_text = "unset" if default is None else default
        kwargs["help"] = f"{field.description} (default: {default_text})"
        if typing.get_origin(annotation) is Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
        elif typing.get_origin(annotation) is list:
            kwargs["action"] = "append"
            kwargs["help"] = f"{field.description} Repeatable. (default: {default_text})"
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            kwargs["type"] = functools.partial(parse_model_flag, annotation)
            kwargs["metavar"] = "SPEC"
            kwargs["help"] = f"{field.description} (default: {_default_text(default)})"
        else:
            kwargs["type"] = str
        group.add_argument(flag_name(name), **kwargs)
    for name in removed_options(model):
        group.add_argument(flag_name(name), "--no-" + flag_name(name)[2:], dest=name, nargs="?", const=True,
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def removed_options(model: type[BaseModel]) -> dict[str, str]:
    """Options of an earlier release that ``model`` refuses with a message (``removed_options``), by name."""
    return getattr(model, "removed_options", {})


def parse_model_flag(model: type[BaseModel], text: str) -> BaseModel | str:
    """The value of a flag for a nested model field, parsed by the model itself.

    ``model.from_spec(text)`` when the model has one (``SamplerConfig``: a preset with overrides or a JSON
    object); else a JSON object through ``model.model_validate_json``. Other text is left to the enclosing
    model's own validator (for example a bare scorer name).
    """
    try:
        if hasattr(model, "from_spec"):
            return model.from_spec(text)
        if text.lstrip().startswith("{"):
            return model.model_validate_json(text)
    except ValidationError as error:
        raise argparse.ArgumentTypeError(f"invalid {model.__name__}: {describe_validation_error(error)}") from None
    except ValueError as error:  # from_spec's own message already names the value and the fix
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _default_text(default: Any) -> str:
    """A nested model's default: ``unset``, or the fields it sets apart from their own defaults."""
    if default is None:
        return "unset"
    changed = default.model_dump(mode="json", exclude_defaults=True) if isinstance(default, BaseModel) else default
    return json.dumps(changed) if changed else "every field at its default"


def _strip_optional(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, __import__("types").UnionType) and len(args) == 1:
        return args[0]
    return annotation


class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 without base-60 integers, so a pool range ``1:8`` stays the string "1:8" (not 68)."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(  # SafeLoader's int pattern minus its last, base-60 branch
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)"
                                        r"|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))


def load_config_file(path: str | None, *models: type[BaseModel], extra_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A YAML/JSON mapping from ``path``; keys may use ``-`` or ``_``.

    With ``models``, every key must be a field of one of them (or a removed option, or one of ``extra_keys``): an
    unknown key, a typo such as ``storage_option:``, is refused naming the closest valid key rather than dropped.
    """
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(file) as f:
        data = yaml.load(f, Loader=_ConfigLoader) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    if models:
        known = {*extra_keys, *(name for model in models for name in (*model.model_fields, *removed_options(model)))}
        for key in data:
            if str(key).replace("-", "_") not in known:
                raise ValueError(unknown_key_message(str(key), path, known))
    return values


def unknown_key_message(key: str, path: str, known: set[str]) -> str:
    """``unknown key 'x' in FILE; did you mean 'y'?`` (difflib's closest valid key), or the list when none is close."""
    shown = clip(key)
    close = difflib.get_close_matches(key.replace("-", "_"), sorted(known), n=1)
    if close:
        return f"unknown key {shown!r} in {path}; did you mean {close[0]!r}?"
    return f"unknown key {shown!r} in {path}; the keys are the command's flags without '--' (see its --help)"


def clip(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (``...`` marks a cut): a message never echoes a huge key."""
    return text if len(text) <= limit else f"{text[:limit]}..."


def build_model(model: type[BaseModel], file_values: dict[str, Any], args: argparse.Namespace,
                source: str = "options") -> BaseModel:
    """``model`` from the config-file values overridden by the flags that were given.

    Validation errors name the flag or key as the user spelled it, with the allowed values. A removed option
    (:func:`removed_options`) is passed on, for the model to refuse with its replacement.
    """
    accepted = {*model.model_fields, *removed_options(model)}
    values = {k: v for k, v in file_values.items() if k in accepted}
    values.update({k: v for k, v in vars(args).items() if k in accepted})
    try:
        return model.model_validate(values)
    except ValidationError as error:
        message = describe_validation_error(error, lambda key: f"{flag_name(key.split('.')[0])} / {key}")
        raise ValueError(f"invalid {source}: {message}") from None
