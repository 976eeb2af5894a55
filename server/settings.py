"""The server's configuration: one settings class read from the environment (`IRG_` prefix).

Built once through `get_settings()` and injected (`SettingsDep`), never read at import time, so tests and
commands can build their own `Settings(...)`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from irg_core.params import MAX_STEPS, MAX_THINK_TOKENS

BAGEL_MAX_SIDE = 1024  # BAGEL's latent grid: max_latent_size 64 x downsample 16


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IRG_", extra="ignore", validate_default=True)

    # where things are
    host: str = Field("127.0.0.1", description="address `irg serve` binds")
    port: int = Field(8000, ge=0, le=65535, description="port `irg serve` binds (0: any free port)")
    redis_url: str | None = Field(None, description="Redis URL; unset: the embedded in-process queue")
    redis_pool_size: int = Field(
        64,
        ge=1,
        le=10_000,
        description="Redis connections an API process uses for commands (watching clients have their own)",
    )
    redis_prefix: str = Field("irg", pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description="prefix of every Redis key")
    model_dir: Path | None = Field(None, description="model directory (default: the embedded demo checkpoint)")
    device: str | None = Field(None, description="worker device: cpu, cuda, cuda:1 ... (default: cuda if any)")
    worker_name: str | None = Field(None, description="worker name in heartbeats (default: host-pid)")
    max_active: int | None = Field(
        None, ge=1, le=256, description="jobs a worker runs at once (default: 8 on CUDA, 2 on CPU)"
    )
    worker_metrics_port: int | None = Field(None, ge=0, le=65535, description="`irg worker` /metrics port")

    # limits
    queue_max: int = Field(100, ge=1, description="jobs waiting at most; past it POST answers 429")
    max_prompt_chars: int = Field(4000, ge=1, le=100_000, description="longest prompt, in characters")
    max_body_bytes: int = Field(256 * 1024, ge=1024, description="largest request body")
    max_side: int = Field(BAGEL_MAX_SIDE, ge=16, le=BAGEL_MAX_SIDE, multiple_of=16, description="largest width/height")
    max_steps: int = Field(MAX_STEPS, ge=2, le=MAX_STEPS, description="most denoising timesteps")
    max_think_tokens: int = Field(MAX_THINK_TOKENS, ge=1, le=MAX_THINK_TOKENS, description="longest thought")
    max_images: int = Field(4, ge=1, le=10, description="most images (`n`) per OpenAI-style request")
    max_upload_bytes: int = Field(
        24 * 1024 * 1024,
        ge=1024,
        description="largest request body on the routes that "
        "take input images (/v1/generations, /v1/images/edits, /v1/chat/completions)",
    )
    max_image_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest input image file")
    max_image_pixels: int = Field(
        40_000_000, ge=256, description="most pixels of an input image (checked from its header, before decoding)"
    )
    max_image_side: int = Field(8192, ge=16, description="longest side of an input image")
    max_input_images: int = Field(4, ge=1, le=16, description="most input images per request (understanding)")

    # timeouts and lifetimes
    wait_timeout_s: float = Field(300.0, gt=0, description="how long `wait: true` blocks at most")
    job_timeout_s: float = Field(1800.0, gt=0, description="a running job fails after this long")
    result_ttl_s: int = Field(86400, ge=1, description="finished jobs, their events and images expire after this")
    keep_finished: int = Field(
        200,
        ge=1,
        description="in-process queue only: finished jobs kept in memory at most "
        "(the oldest go first, even before result_ttl_s)",
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After of a 429")
    lease_s: float = Field(30.0, gt=0, description="a claimed job's lease; renewed every lease_s / 3")
    heartbeat_s: float = Field(2.0, gt=0, description="worker heartbeat period; a worker is dead after 3 missed")
    cancel_poll_s: float = Field(0.2, gt=0, description="how often a busy worker looks for a cancellation")
    max_attempts: int = Field(3, ge=1, le=100, description="runs of a job whose workers died, before it fails")
    drain_s: float = Field(
        25.0,
        ge=0,
        description="on SIGTERM, how long a worker may finish its job before "
        "handing it back (fits a 30 s termination grace period)",
    )
    sse_ping_s: float = Field(15.0, gt=0, description="SSE keep-alive comment period")
    sse_send_timeout_s: float = Field(30.0, gt=0, description="an SSE client that takes no data this long is dropped")

    # security
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted bearer keys, comma-separated (empty: no authentication)"
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if len(key) < 16:
                raise ValueError("every API key needs at least 16 characters")
        return keys

    @property
    def worker_ttl_s(self) -> float:
        """A heartbeat older than this means the worker is gone."""
        return 3 * self.heartbeat_s


SECRET_SETTINGS = frozenset({"api_keys", "redis_url"})  # never echoed in an error (keys, Redis passwords)


class SettingsError(ValueError):
    """A setting is invalid; the message names the environment variable (or flag) and the problem, one line."""


def settings_problems(
    error: ValidationError, flags: Mapping[str, str] | None = None, given: Mapping[str, Any] | None = None
) -> str:
    """One line naming each invalid setting by where it came from: `IRG_PORT='abc': ...` for the environment,
    `--port 70000: ...` for a command-line flag (`flags` maps field names to flags, `given` holds their values)."""
    flags, given = flags or {}, given or {}
    problems = []
    for e in error.errors():
        name = str(e["loc"][0]) if e.get("loc") else ""
        problem = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if name in given and name in flags:
            source, value = flags[name], given[name]
            shown = "" if name in SECRET_SETTINGS else f" {value}"
            problems.append(f"{source}{shown}: {problem}")
            continue
        env = f"IRG_{name.upper()}" if name else "IRG_*"
        value = os.environ.get(env)
        shown = "" if value is None or name in SECRET_SETTINGS else f"={value!r}"
        problems.append(f"{env}{shown}: {problem}")
    return "; ".join(problems)


def load_settings(flags: Mapping[str, str] | None = None, **given: Any) -> Settings:
    """Settings from the environment and `given` values; SettingsError (one readable line) when one is invalid."""
    try:
        return Settings(**given)
    except ValidationError as e:
        raise SettingsError(f"invalid setting: {settings_problems(e, flags, given)}") from None


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read from the environment once (SettingsError names a bad IRG_ variable)."""
    return load_settings()
