"""Dependencies of the routes, as typed aliases: settings, the queue, the caller's identity, a job it owns.

All are `async def`: FastAPI runs a plain `def` dependency in a thread pool, a hop per request for nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from irg_core.defaults import ServingDefaults
from server.api import body
from server.api.errors import ApiError
from server.jobs import JobRecord
from server.queue.base import JobQueue
from server.settings import Settings

JOB_ID = re.compile(r"^gen_[0-9a-f]{24}$")
bearer = HTTPBearer(auto_error=False, description="an API key, when the server has keys configured (IRG_API_KEYS)")


async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_queue(request: Request) -> JobQueue:
    queue: JobQueue = request.app.state.queue
    return queue


async def get_serving_defaults(request: Request) -> ServingDefaults:
    defaults: ServingDefaults = request.app.state.serving_defaults
    return defaults


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
DefaultsDep = Annotated[ServingDefaults, Depends(get_serving_defaults)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def get_owner(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None
) -> str:
    """Who calls: a digest of their API key ("" when the server has no keys); 401 without a valid key."""
    if not settings.api_keys:
        return ""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(401, "unauthorized", "an API key is required (Authorization: Bearer <key>)", headers=challenge)
    digest = key_digest(credentials.credentials)
    if not any(hmac.compare_digest(digest, key_digest(k)) for k in settings.api_keys):
        raise ApiError(401, "unauthorized", "the API key is not valid", headers=challenge)
    return digest[:32]


OwnerDep = Annotated[str, Depends(get_owner)]


async def get_job(job_id: str, queue: QueueDep, owner: OwnerDep) -> JobRecord:
    """The job `job_id` if it exists and belongs to the caller (another key's job is a 404 too)."""
    job = await queue.get(job_id) if JOB_ID.match(job_id) else None
    if job is None or (owner and not hmac.compare_digest(job.owner, owner)):
        raise ApiError(404, "not_found", f"no generation {job_id!r}", "job_id")
    return job


JobDep = Annotated[JobRecord, Depends(get_job)]


async def require_json(request: Request) -> None:
    """415 for a body sent as anything but JSON (a form, text/plain...), naming the type expected."""
    content_type = request.headers.get("content-type")
    if not body.is_json(content_type):
        raise ApiError(415, "unsupported_media_type", body.wrong_type(content_type), "Content-Type")
