"""Error bodies of the endpoint: OpenAI's ``{"error": {"message", "type", "param", "code"}}`` shape, and messages
that quote at most ``QUOTE_CHARS`` characters of anything a client sent, however large it was.

Clients (the ``openai`` package among them) read the ``error`` object; a huge field echoed in full would turn a
small mistake into a response of hundreds of kilobytes.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

QUOTE_CHARS = 80  # of a client's value quoted in an error message


def error_response(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-shaped error body (``{"error": {"message", "type", "param", "code"}}``)."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def clip(text: str) -> str:
    """``text`` cut to its first ``QUOTE_CHARS`` characters (``...`` marks a cut), e.g. a client's key name."""
    return text if len(text) <= QUOTE_CHARS else f"{text[:QUOTE_CHARS]}..."


def quote(value) -> str:
    """``repr(value)``, cut to a short prefix that says how long the whole was: errors never echo a big input."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else f"{text[:QUOTE_CHARS]}... ({len(text)} characters)"


def clip_echoes(message: str, value: str) -> str:
    """``message`` with every run of more than ``QUOTE_CHARS`` characters copied from ``value`` cut to its first
    ``QUOTE_CHARS`` (then ``...``).

    For messages written by code that quotes its input freely (the engine's sampler-spec errors quote the whole
    spec and parts of it). The cost is ``len(message) x len(value)``: keep ``value`` bounded.
    """
    width = QUOTE_CHARS + 1
    if len(message) < width or len(value) < width:
        return message
    pieces, start, i = [], 0, 0
    while i + width <= len(message):
        if message[i:i + width] not in value:
            i += 1
            continue
        end = i + width
        while end < len(message) and message[end + 1 - width:end + 1] in value:
            end += 1
        pieces += [message[start:i + QUOTE_CHARS], "..."]
        start = i = end
    return "".join(pieces) + message[start:]
