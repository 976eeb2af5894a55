"""Every Redis key the server uses, in one place (the whole schema at a glance, arq style).

`{p}` is the deployment's prefix (IRG_REDIS_PREFIX, default `irg`). The Lua scripts receive these names, or
for keys of jobs they discover themselves (claim, recovery) the prefixes below, and append the job id.
"""

from __future__ import annotations

import json

from irg_core.params import MAX_ROUNDS

PENDING_TTL_S = 7 * 86400  # a job not finished after a week is dropped (a safety net; jobs end long before)
WAKE_MAXLEN = 1000


class Keys:
    def __init__(self, prefix: str = "irg"):
        p = prefix
        self.queue = f"{p}:queue"  # LIST of waiting job ids; head = next to run
        self.running = f"{p}:running"  # SET of claimed job ids
        self.wake = f"{p}:wake"  # STREAM, one entry per job made claimable; idle workers block reading it
        self.workers = f"{p}:workers"  # SET of worker names that sent a heartbeat
        self.job_prefix = f"{p}:job:"  # HASH {p}:job:{id}: the job record (server.jobs.JobRecord fields)
        self.lease_prefix = f"{p}:lease:"  # STRING {p}:lease:{id}: the claiming worker's token, PX lease
        self.tries_prefix = f"{p}:tries:"  # INT {p}:tries:{id}: attempts started (INCR on claim)
        self.events_prefix = f"{p}:events:"  # STREAM {p}:events:{id}: the job's events; entry ids = SSE ids
        self.image_prefix = f"{p}:image:"  # STRING {p}:image:{id}:{round}: PNG bytes
        self.worker_prefix = f"{p}:worker:"  # STRING {p}:worker:{name}: heartbeat JSON, PX 3 x heartbeat
        self.live_prefix = f"{p}:live:"  # PUB/SUB channel {p}:live:{id}: ephemeral events (previews), not stored

    def job(self, job_id: str) -> str:
        return self.job_prefix + job_id

    def lease(self, job_id: str) -> str:
        return self.lease_prefix + job_id

    def tries(self, job_id: str) -> str:
        return self.tries_prefix + job_id

    def events(self, job_id: str) -> str:
        return self.events_prefix + job_id

    def image(self, job_id: str, round_index: int) -> str:
        return f"{self.image_prefix}{job_id}:{round_index}"

    def live(self, job_id: str) -> str:
        return self.live_prefix + job_id

    def worker(self, name: str) -> str:
        return self.worker_prefix + name

    def expiring(self, job_id: str) -> list[str]:
        """The keys of a job that live on for the result's lifetime once it ends: job, events, tries, images."""
        return [
            self.job(job_id),
            self.events(job_id),
            self.tries(job_id),
            *(self.image(job_id, k) for k in range(1, MAX_ROUNDS + 1)),
        ]

    def lua_prefixes(self) -> str:
        """The prefixes the claim and recovery scripts build job keys from."""
        return json.dumps(
            {
                "job": self.job_prefix,
                "lease": self.lease_prefix,
                "tries": self.tries_prefix,
                "events": self.events_prefix,
                "image": self.image_prefix,
                "max_rounds": MAX_ROUNDS,
            }
        )
