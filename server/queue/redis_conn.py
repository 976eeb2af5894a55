"""How the Redis clients connect and recover: options of the pooled clients, and errors told without addresses.

After a Redis restart every pooled connection is stale. Each command therefore runs under a retry policy that
re-dials and retries on connection errors with a short exponential backoff (every queue operation is idempotent:
a job's id is fixed before it is submitted, events carry their sequence number, the Lua steps check their
lease); a connection idle for `HEALTH_CHECK_S` is pinged before it is used. While Redis is really down a command
fails after about `RETRIES` quick attempts (well under a second), so the API answers 503 promptly.

The async client needs `redis.asyncio.retry.Retry`: given the sync `redis.retry.Retry`, an asyncio connection
calls it without awaiting the operation, and no command is ever retried.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis.asyncio.retry
import redis.retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)
DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
RETRIES = 3  # retries of a command after a connection error: 50, 100, 200 ms apart
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.05, 0.5
HEALTH_CHECK_S = 10  # a pooled connection idle this long is pinged before use
CONNECT_TIMEOUT_S, SOCKET_TIMEOUT_S = 2.0, 10.0


def _backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S)


def _common() -> dict[str, Any]:
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "health_check_interval": HEALTH_CHECK_S,
        "socket_keepalive": True,
    }


def async_client_options() -> dict[str, Any]:
    """Options of a `redis.asyncio` client or pool."""
    return {**_common(), "retry": redis.asyncio.retry.Retry(_backoff(), RETRIES)}


def sync_client_options() -> dict[str, Any]:
    """Options of a `redis` (sync) client or pool."""
    return {**_common(), "retry": redis.retry.Retry(_backoff(), RETRIES)}


def public_reason(error: BaseException) -> str:
    """What may be said to any caller about a Redis error: its kind, never the server's address."""
    if isinstance(error, RedisTimeoutError):
        return "redis did not answer in time"
    return "redis cannot be reached"


class EveryFewSeconds:
    """Log one line per `period` s at most (an outage fails every request; its cause needs saying once)."""

    def __init__(self, period: float = 5.0):
        self.period, self.next = period, 0.0

    def warn(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now >= self.next:
            self.next = now + self.period
            log.warning(msg, *args)


DETAIL = EveryFewSeconds()
