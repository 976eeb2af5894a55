"""Whether a Redis restart would lose jobs: read Redis's persistence settings, say so in the log and a metric.

API.md promises that an accepted job is never dropped; with Redis that holds only as far as Redis persists what
it is told. `irg serve --redis` and `irg worker` read the settings at start (`check_async` / `check_sync`):

- `aof`: append-only file on; a restart keeps every job (what docs/deploy.md asks for: `appendonly yes`);
- `rdb`: snapshots only; a crash loses what changed since the last snapshot;
- `none`: no persistence; a restart loses every job;
- `unknown`: the settings could not be read (CONFIG disabled and no INFO either, or Redis unreachable).

Anything but `aof` logs a warning. `irg_redis_persistence{mode}` is 1 for the mode found, and
`irg_redis_durable` is 1 only for `aof` (alert on `irg_redis_durable == 0`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from server import metrics

log = logging.getLogger(__name__)
MODES = ("aof", "rdb", "none", "unknown")
CONSEQUENCE = {
    "rdb": "Redis persists by snapshots only: a Redis crash loses the jobs accepted since the last snapshot",
    "none": "Redis has no persistence: a Redis restart loses every queued and running job",
    "unknown": "the persistence settings of Redis could not be read: a Redis restart may lose jobs",
}
ADVICE = "run Redis with `appendonly yes` (docs/deploy.md)"


@dataclass(frozen=True)
class Persistence:
    mode: str  # one of MODES
    detail: str = ""

    @property
    def durable(self) -> bool:
        return self.mode == "aof"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def classify(config: dict[str, Any] | None, info: dict[str, Any] | None) -> Persistence:
    """The mode from `CONFIG GET appendonly`/`save` (preferred) or, where CONFIG is disabled (managed Redis),
    `INFO persistence` (which tells AOF but not the snapshot schedule)."""
    if config and "appendonly" in config:
        aof = _text(config["appendonly"]).lower() == "yes"
        save = _text(config.get("save", "")).strip()
        if aof:
            return Persistence("aof", "appendonly yes")
        return Persistence("rdb", f"save {save!r}") if save else Persistence("none", "appendonly no, save ''")
    if info and "aof_enabled" in info:
        if int(info["aof_enabled"]) == 1:
            return Persistence("aof", "INFO aof_enabled:1")
        return Persistence("unknown", "INFO aof_enabled:0, snapshot schedule unknown (CONFIG refused)")
    return Persistence("unknown", "CONFIG and INFO refused")


def report(found: Persistence, who: str) -> Persistence:
    """Log and export what was found."""
    for mode in MODES:
        metrics.REDIS_PERSISTENCE.labels(mode).set(1 if mode == found.mode else 0)
    metrics.REDIS_DURABLE.set(1 if found.durable else 0)
    if found.durable:
        log.info("%s: redis persistence: %s (%s)", who, found.mode, found.detail)
    else:
        log.warning("%s: %s (%s); %s", who, CONSEQUENCE[found.mode], found.detail, ADVICE)
    return found


async def check_async(client: Any, who: str) -> Persistence:
    """Read and report the persistence of the Redis behind a `redis.asyncio` client."""
    config = info = None
    try:
        config = await client.config_get("appendonly") | await client.config_get("save")
    except RedisError:
        try:
            info = await client.info("persistence")
        except RedisError as e:
            log.debug("redis INFO refused: %s", e)
    return report(classify(config, info), who)


def check_sync(client: Any, who: str) -> Persistence:
    """Read and report the persistence of the Redis behind a sync `redis` client."""
    config = info = None
    try:
        config = client.config_get("appendonly") | client.config_get("save")
    except RedisError:
        try:
            info = client.info("persistence")
        except RedisError as e:
            log.debug("redis INFO refused: %s", e)
    return report(classify(config, info), who)
