"""Idempotency-Key: the same key with the same request returns the job it created; the same key with a
different request is refused (409), as other idempotent APIs do, instead of silently answering with a job that
is not what was asked for.

A job created under a key keeps a digest of its request in its options (never shown to clients). How the
response is delivered (`stream`, `wait`) is not part of the request: a client may retry a submission with
`"wait": true` after its stream dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from server.api.errors import ApiError

OPTION = "request_digest"
DELIVERY = frozenset({"stream", "wait"})


def fingerprint(body: BaseModel) -> str:
    """A digest of what the request asks for: every field as validated (defaults included), key order ignored."""
    asked = body.model_dump(mode="json", exclude=set(DELIVERY))
    return hashlib.sha256(json.dumps(asked, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def check_same(options: Mapping[str, Any], body: BaseModel, key: str, job_id: str) -> None:
    """409 when the job made under `key` was asked for with a different request than `body`."""
    stored = options.get(OPTION)
    if stored is not None and stored != fingerprint(body):
        raise ApiError(
            409,
            "idempotency_conflict",
            f"Idempotency-Key {key!r} was already used with a different "
            f"request (job {job_id}); send the same request to get that job, or use a new key",
            "Idempotency-Key",
        )
