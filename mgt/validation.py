"""One-line messages for pydantic validation errors, shared by every place that parses user input.

A ``ValidationError`` prints as a multi-line block with pydantic's documentation links; the CLI, the
config files, the sampler specs and the Serve arguments report it instead as one line that names each
bad key as the user spelled it, the problem and the value given.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from pydantic import ValidationError

# Keys whose values may hold credentials: their errors never quote the value given.
UNQUOTED = re.compile(r"storage_options|secret|token|password|passwd|credential", re.IGNORECASE)


def describe_validation_error(error: ValidationError, name: Callable[[str], str] | None = None) -> str:
    """``"key: problem (got value); ..."`` for every problem of ``error``.

    Args:
        error: what ``model_validate`` raised.
        name: spells a dotted field path as the user wrote it (e.g. ``"steps"`` -> ``"--steps / steps"``);
            the dotted path itself when None.

    A problem of the whole model (a cross-field check, whose location is empty) is its message alone: its
    input is the whole mapping, too long to echo. Neither is the value of a key that may hold credentials
    (``UNQUOTED``: ``storage_options``, ``*token*``, ``*secret*`` ...).
    """
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if key and UNQUOTED.search(key):  # the value may hold credentials: never echoed
            problems.append(f"{name(key) if name else key}: {item['msg']}")
        elif key:
            problems.append(f"{name(key) if name else key}: {item['msg']} (got {item.get('input')!r})")
        else:
            problems.append(item["msg"])
    return "; ".join(problems)
