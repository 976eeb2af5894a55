"""What a request body must be, in words a client can act on: JSON by its Content-Type, an object, not empty,
not nested past what the parser takes, UTF-8 (pure functions; the 415 check is `deps.require_json`)."""

from __future__ import annotations

import email.message
from typing import Any

EXPECTED = "application/json"


def is_json(content_type: str | None) -> bool:
    """application/json or application/*+json; no Content-Type at all is read as JSON too (as FastAPI does)."""
    if not content_type:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def wrong_type(content_type: str | None) -> str:
    return f"the body must be JSON: send Content-Type: {EXPECTED} (got {content_type!r})"


JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "null",
}


def whole_body_error(kind: str, value: Any) -> str:
    """The message for a body that is not a JSON object at all (pydantic's error at loc ("body",))."""
    if kind == "missing":
        return f"the request body is empty: send a JSON object (Content-Type: {EXPECTED}) with at least a prompt"
    return f"the body must be a JSON object, not {JSON_TYPES.get(type(value), 'that')}"


def unreadable_body(cause: BaseException | None) -> str:
    """Why the JSON parser could not read the body (FastAPI answers 400 and chains the parser's exception)."""
    if isinstance(cause, RecursionError):
        return "the body's JSON is nested too deeply to parse (arrays or objects hundreds of levels deep)"
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not UTF-8 text (byte {cause.start}: {cause.reason})"
    return "the body could not be read as JSON text"
