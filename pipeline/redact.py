"""Redaction of credentials from anything a job writes or prints: manifest.json, --print-config, error texts.

Two rules, applied to a dumped config (nested dicts and lists):

- under ``storage_options`` every value is hidden except an allow-list of locations that are not secrets
  (``SAFE_STORAGE_OPTIONS``: endpoint, region, anonymous access);
- anywhere, the value of a key whose name looks like a credential (``CREDENTIAL_KEY``) is hidden.

Only values are replaced (by ``REDACTED``): the keys stay, so a reader sees that a key was set. The config
hash never covers ``storage_options`` (``pipeline.config.UNHASHED_OPTIONS``), so redacting the recorded
config leaves resume untouched.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
MIN_SECRET = 4  # shorter hidden values (flags, counts) are not scrubbed out of free text: they would mangle it
CREDENTIAL_KEY = re.compile(r"secret|token|password|passwd|key|credential", re.IGNORECASE)
# storage_options entries kept in clear, by dotted path below storage_options.
SAFE_STORAGE_OPTIONS = frozenset({"endpoint_url", "region", "region_name", "anon", "use_ssl",
                                  "client_kwargs.endpoint_url", "client_kwargs.region_name"})


def redact(config: Any, _storage: str | None = None) -> Any:
    """A copy of ``config`` (dicts, lists, scalars) with credential values replaced by ``REDACTED``.

    ``_storage``: the dotted path below ``storage_options`` while inside it, else None.
    """
    if isinstance(config, (list, tuple)):
        return [redact(item, _storage) for item in config]
    if not isinstance(config, dict):
        return config
    redacted = {}
    for key, value in config.items():
        if _storage is None:
            path = "" if key == "storage_options" else None
        else:
            path = f"{_storage}.{key}" if _storage else str(key)
        hidden_below_storage = bool(path) and not isinstance(value, dict) and path not in SAFE_STORAGE_OPTIONS
        if hidden_below_storage or (CREDENTIAL_KEY.search(str(key)) and value not in (None, "", {}, [])):
            redacted[key] = REDACTED
        else:
            redacted[key] = redact(value, path)
    return redacted


def secret_values(config: Any) -> list[str]:
    """The strings ``redact`` hides in ``config``, to scrub them out of free text such as error messages."""
    found: list[str] = []

    def walk(original: Any, hidden: Any) -> None:
        if hidden == REDACTED and original != REDACTED:
            found.extend(leaf for leaf in _leaves(original) if isinstance(leaf, str) and len(leaf) >= MIN_SECRET)
        elif isinstance(original, dict):
            for key, value in original.items():
                walk(value, hidden[key])
        elif isinstance(original, (list, tuple)):
            for value, masked in zip(original, hidden):
                walk(value, masked)

    walk(config, redact(config))
    return found


def redact_text(text: str, secrets: list[str]) -> str:
    """``text`` with every occurrence of each secret replaced by ``REDACTED`` (longest first)."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]
