"""Command-line flags generated from the pydantic config models, and YAML config files merged under them.

Every field of a config model becomes ``--field-name`` with the field's description as help, so help
text and defaults live only in the models. Flags left unset do not override the config file; the file
does not override the models' defaults unless it names a key. Precedence: flag > ``--config`` file >
model default.
"""

from __future__ import annotations

import argparse
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_model_arguments(parser: argparse.ArgumentParser, model: type[BaseModel], title: str | None = None,
                        skip: tuple[str, ...] = ()) -> None:
    """Add one flag per scalar field of ``model`` (nested models are skipped; give them their own flag)."""
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
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            continue
        else:
            kwargs["type"] = str
        group.add_argument(flag_name(name), **kwargs)


def _strip_optional(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType")) and len(args) == 1:
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


def load_config_file(path: str | None) -> dict[str, Any]:
    """A YAML/JSON mapping from ``path``; keys may use ``-`` or ``_``."""
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(file) as f:
        data = yaml.load(f, Loader=_ConfigLoader) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_model(model: type[BaseModel], file_values: dict[str, Any], args: argparse.Namespace,
                source: str = "options") -> BaseModel:
    """``model`` from the config-file values overridden by the flags that were given.

    Validation errors name the flag or key as the user spelled it, with the allowed values.
    """
    values = {k: v for k, v in file_values.items() if k in model.model_fields}
    values.update({k: v for k, v in vars(args).items() if k in model.model_fields})
    try:
        return model.model_validate(values)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            key = ".".join(str(p) for p in item["loc"])
            problems.append(f"{flag_name(key.split('.')[0])} / {key}: {item['msg']} (got {item.get('input')!r})")
        raise ValueError(f"invalid {source}: " + "; ".join(problems)) from None
