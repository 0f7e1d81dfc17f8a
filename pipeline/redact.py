"""Redaction of credentials from anything a job writes or prints: manifest.json, --print-config, error texts.

Three rules, applied to a dumped config (nested dicts and lists):

- under ``storage_options`` every value is hidden except an allow-list of locations that are not secrets
  (``SAFE_STORAGE_OPTIONS``: endpoint, region, anonymous access);
- anywhere, the value of a key whose name looks like a credential (``CREDENTIAL_KEY``) is hidden;
- anywhere, the user-info of a URL (``https://user:pass@host``, an ``endpoint_url`` too) is hidden.

Only values are replaced (by ``REDACTED``): the keys stay, so a reader sees that a key was set. The config
hash never covers ``storage_options`` (``pipeline.config.UNHASHED_OPTIONS``), so redacting the recorded
config leaves resume untouched.

Free text (an error message) is scrubbed of the *secrets* only (``secret_values``): the values of credential keys
and URL user-info. The other hidden storage options (a profile name, a cache folder such as "path") are hidden
in the recorded config but stay in messages, where scrubbing every occurrence of a common word mangled the text.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
MIN_SECRET = 4  # shorter hidden values (flags, counts) are not scrubbed out of free text: they would mangle it
CREDENTIAL_KEY = re.compile(r"secret|token|password|passwd|key|credential|connection_string|signature",
                            re.IGNORECASE)
USERINFO = re.compile(r"(?<=://)[^/@\s]+(?=@)")  # user:pass in scheme://user:pass@host
# storage_options entries kept in clear, by dotted path below storage_options.
SAFE_STORAGE_OPTIONS = frozenset({"endpoint_url", "region", "region_name", "anon", "use_ssl",
                                  "client_kwargs.endpoint_url", "client_kwargs.region_name"})


def redact(config: Any, _storage: str | None = None) -> Any:
    """A copy of ``config`` (dicts, lists, scalars) with credential values replaced by ``REDACTED``.

    ``_storage``: the dotted path below ``storage_options`` while inside it, else None.
    """
    if isinstance(config, (list, tuple)):
        return [redact(item, _storage) for item in config]
    if isinstance(config, str):
        return USERINFO.sub(REDACTED, config)
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
    """The secrets in ``config``, to scrub them out of free text such as error messages: the string values of
    credential keys (``CREDENTIAL_KEY``, at any depth) and the user-info of URLs. Other hidden storage options
    are not secrets, and common words among them ("path", "default") must not be cut out of a message."""
    found: list[str] = []

    def walk(value: Any, credential: bool) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, credential or bool(CREDENTIAL_KEY.search(str(key))))
        elif isinstance(value, (list, tuple)):
            for inner in value:
                walk(inner, credential)
        elif isinstance(value, str):
            found.extend(USERINFO.findall(value))
            if credential and len(value) >= MIN_SECRET:
                found.append(value)

    walk(config, False)
    return found


def redact_text(text: str, secrets: list[str]) -> str:
    """``text`` with every occurrence of each secret replaced by ``REDACTED`` (longest first)."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text
