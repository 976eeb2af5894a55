"""A job's record as the queue stores it (a flat hash of strings), and how requests and clients see it.

Both queue backends keep a job as the same `dict[str, str]` (a Redis hash in the Redis backend), so one
encoding serves both, and the worker updates a job by sending the fields it changed.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from irg_core.defaults import RECIPE, ServingDefaults
from irg_core.params import (
    GenerationParams,
    ParamError,
    RoundGuidance,
    StepCacheParams,
    UnderstandingParams,
    image_rounds,
    round_guidance,
)
from irg_core.sizes import edit_output_size
from server.inputs import ImageInputError, ImageLimits, decode_base64, decode_image, sniff_format
from server.schemas import DEFAULTS, GenerationOptions, JobLinks, JobPublic, TextOut
from server.settings import Settings

JSON_FIELDS = ("params", "options", "texts", "images", "timings", "usage", "error", "answer", "inputs")
FLOAT_FIELDS = ("created_at", "started_at", "finished_at")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")


class RequestError(ValueError):
    """A request the schema let through breaks a deployment limit or a cross-field rule (HTTP 422)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


def new_job_id() -> str:
    return "gen_" + secrets.token_hex(12)


@dataclass
class JobRecord:
    id: str
    params: dict[str, Any]  # ResolvedParams as JSON
    owner: str = ""  # a digest of the API key that submitted it ("" without keys)
    created_at: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)  # image_b64
    status: str = "queued"
    attempt: int = 0
    worker: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    texts: list[dict[str, Any]] = field(default_factory=list)  # TextOut
    images: list[dict[str, Any]] = field(default_factory=list)  # {round, kind, width, height}
    timings: dict[str, Any] = field(default_factory=dict)  # {run_seconds, stages}
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancel: bool = False
    answer: dict[str, Any] | None = None  # AnswerOut (task understand)
    inputs: list[str] = field(default_factory=list)  # the input images' bytes, base64, as uploaded (validated)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def image_rounds(self) -> int:
        return int(self.params["rounds"])

    def to_fields(self, *names: str) -> dict[str, str]:
        """The hash fields (all, or those named) as strings."""
        out = {}
        for name in names or tuple(asdict(self)):
            value = getattr(self, name)
            if name in JSON_FIELDS:
                out[name] = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
            elif value is None:
                out[name] = ""
            elif isinstance(value, bool):
                out[name] = "1" if value else ""
            else:
                out[name] = str(value)
        return out

    @classmethod
    def from_fields(cls, raw: dict[Any, Any]) -> JobRecord:
        d = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        kw: dict[str, Any] = {"id": d["id"], "params": json.loads(d["params"])}
        for name in JSON_FIELDS[1:]:
            if d.get(name):
                kw[name] = json.loads(d[name])
        for name in FLOAT_FIELDS:
            kw[name] = float(d[name]) if d.get(name) else None
        kw["created_at"] = kw["created_at"] or 0.0
        kw.update(
            owner=d.get("owner", ""),
            status=d.get("status", "queued"),
            attempt=int(d.get("attempt") or 0),
            worker=d.get("worker", ""),
            cancel=bool(d.get("cancel")),
        )
        return cls(**kw)


# What the API reads of a job: everything but the input images' bytes (megabytes; only a worker needs them).
API_FIELDS = [name for name in JobRecord.__dataclass_fields__ if name != "inputs"]


# -- requests -> parameters ----------------------------------------------------------------------------


def _check_limits(opts: GenerationOptions, prompt: str, settings: Settings, **values: int) -> None:
    if len(prompt) > settings.max_prompt_chars:
        raise RequestError("prompt", f"must be at most {settings.max_prompt_chars} characters")
    side = (16, settings.max_side, "a multiple of 16 ")
    limits = {
        "width": side,
        "height": side,
        "steps": (2, settings.max_steps, ""),
        "max_tokens": (1, settings.max_think_tokens, ""),
    }
    for name, value in values.items():
        lo, hi, what = limits[name]
        if value > hi:
            raise RequestError(_api_field(name), f"must be {what}within [{lo}, {hi}] on this server")
    if opts.mode != "irg" and opts.rounds not in (None, 1):
        raise RequestError("rounds", f"mode {opts.mode} draws one image: rounds must be 1 or left out")
    if opts.mode == "irg" and opts.rounds == 1:
        raise RequestError("rounds", "mode irg needs at least 2 rounds (a draft and a final image)")


@dataclass(frozen=True)
class InputImages:
    """A request's input images, validated: the bytes to store with the job and what the API reports."""

    raw: list[bytes]
    meta: list[dict[str, Any]]

    @property
    def b64(self) -> list[str]:
        import base64

        return [base64.b64encode(b).decode("ascii") for b in self.raw]


def image_limits(settings: Settings) -> ImageLimits:
    return ImageLimits(settings.max_image_bytes, settings.max_image_pixels, settings.max_image_side)


def check_input_images(images: list[str | bytes], settings: Settings, field_name: str = "images") -> InputImages:
    """Base64 strings / data URLs or raw bytes -> validated input images; raises ImageInputError (`field` set).

    Every image is decoded once here (limits first), so a bad one is refused before anything is queued."""
    import hashlib

    if len(images) > settings.max_input_images:
        raise ImageInputError(
            f"{field_name}: at most {settings.max_input_images} input images (IRG_MAX_INPUT_IMAGES)",
            413,
            "max_input_images",
        )
    limits = image_limits(settings)
    raw, meta = [], []
    for i, item in enumerate(images):
        where = f"{field_name}[{i}]" if len(images) > 1 or field_name == "images" else field_name
        try:
            data = decode_base64(item, limits) if isinstance(item, str) else item
            image = decode_image(data, limits)
        except ImageInputError as e:
            e.message = f"{where}: {e.message}"
            e.args = (e.message,)
            e.field = where
            raise
        raw.append(data)
        meta.append(
            {
                "format": sniff_format(data),
                "width": image.width,
                "height": image.height,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    return InputImages(raw, meta)


def input_images(job: JobRecord) -> list[Any]:
    """The job's input images as PIL RGB images (decoded exactly as at submission)."""
    import base64

    loose = ImageLimits(max_bytes=2**40, max_pixels=2**40, max_side=2**31, min_side=1)  # checked at submission
    return [decode_image(base64.b64decode(b), loose) for b in job.inputs]


def build_params(
    opts: GenerationOptions,
    prompt: str,
    width: int | None,
    height: int | None,
    settings: Settings,
    defaults: ServingDefaults = RECIPE,
    inputs: InputImages | None = None,
    task: str = "generate",
) -> dict[str, Any]:
    """The resolved parameters (ResolvedParams JSON) of a request; raises RequestError (422).

    A field left out takes the mode's default in `defaults` (the model's serving defaults, see
    irg_core.defaults; guidance from irg_core.params), capped by the deployment's limit. With one input
    image and task generate the job is an edit (its size follows the image); task understand answers the
    prompt about the input images."""
    n_inputs = len(inputs.raw) if inputs else 0
    if task == "understand":
        return _understanding_params(opts, prompt, settings, inputs, defaults)
    edit = n_inputs > 0
    if n_inputs > 1:
        raise RequestError("images", "an edit takes one input image (several are for task understand)")
    if edit:
        if width is not None or height is not None:
            raise RequestError(
                "width" if width is not None else "height",
                "an edit's output size follows the input image (the VAE transform's resize of it, "
                "as in the official code); leave width and height out",
            )
        assert inputs is not None
        width, height = edit_output_size(inputs.meta[0]["width"], inputs.meta[0]["height"])
    mode = defaults.for_mode(opts.mode)
    width = width or min(mode.width, settings.max_side)
    height = height or min(mode.height, settings.max_side)
    steps = opts.steps or min(mode.steps, settings.max_steps)
    max_tokens = opts.thinking.max_tokens or min(mode.max_think_tokens, settings.max_think_tokens)
    temperature = mode.temperature if opts.thinking.temperature is None else opts.thinking.temperature
    _check_limits(opts, prompt, settings, width=width, height=height, steps=steps, max_tokens=max_tokens)
    rounds = (opts.rounds or DEFAULTS["rounds"]) if opts.mode == "irg" else 1
    given = opts.guidance or []
    n = image_rounds(opts.mode, rounds)
    if len(given) > n:
        raise RequestError("guidance", f"has {len(given)} entries but mode {opts.mode} draws {n} image(s)")
    guidance = []
    for k in range(1, n + 1):
        overrides = given[k - 1].model_dump(exclude_none=True) if k <= len(given) else {}
        guidance.append(round_guidance(k, overrides, edit).to_dict())
    seed = opts.seed if opts.seed is not None else secrets.randbits(31)  # < 2^53: exact in JavaScript too
    params = {
        "prompt": prompt,
        "mode": opts.mode,
        "rounds": rounds,
        "width": width,
        "height": height,
        "steps": steps,
        "seed": seed,
        "thinking": {"max_tokens": max_tokens, "temperature": temperature},
        "guidance": guidance,
        "cache": opts.cache.model_dump() if opts.cache is not None else None,
        "previews": opts.previews,
        "preview_decoder": opts.preview_decoder,
    }
    if edit:
        assert inputs is not None
        params.update(edit=True, inputs=inputs.meta)
    try:
        generation_params(params).validate(max_side=settings.max_side)
    except ParamError as e:
        raise RequestError(_api_field(e.field), e.message) from e
    return params


def _understanding_params(
    opts: GenerationOptions,
    prompt: str,
    settings: Settings,
    inputs: InputImages | None,
    defaults: ServingDefaults = RECIPE,
) -> dict[str, Any]:
    if inputs is None or not inputs.raw:
        raise RequestError("images", "task understand needs at least one input image")
    mode = opts.mode if "mode" in opts.model_fields_set else "direct"
    if mode == "irg":
        raise RequestError(
            "mode",
            "task understand takes mode direct (an answer) or think (BAGEL's thinking prompt first); irg draws images",
        )
    if opts.rounds not in (None, 1) or opts.guidance:
        raise RequestError(
            "rounds" if opts.rounds not in (None, 1) else "guidance",
            "task understand draws no image: leave rounds and guidance out",
        )
    if opts.steps is not None:
        raise RequestError("steps", "task understand draws no image: leave steps out")
    if len(prompt) > settings.max_prompt_chars:
        raise RequestError("prompt", f"must be at most {settings.max_prompt_chars} characters")
    # BAGEL answers greedily with up to its own thought limit (the think/direct defaults of the model)
    max_tokens = opts.thinking.max_tokens or min(defaults.for_mode(mode).max_think_tokens, settings.max_think_tokens)
    temperature = 0.0 if opts.thinking.temperature is None else opts.thinking.temperature
    if max_tokens > settings.max_think_tokens:
        raise RequestError("thinking.max_tokens", f"must be within [1, {settings.max_think_tokens}] on this server")
    seed = opts.seed if opts.seed is not None else secrets.randbits(31)
    params = {
        "prompt": prompt,
        "mode": mode,
        "rounds": 0,
        "width": 0,
        "height": 0,
        "steps": 0,
        "seed": seed,
        "thinking": {"max_tokens": max_tokens, "temperature": temperature},
        "guidance": [],
        "task": "understand",
        "edit": False,
        "inputs": inputs.meta,
    }
    try:
        understanding_params(params).validate()
    except ParamError as e:
        raise RequestError(_api_field(e.field), e.message) from e
    return params


def understanding_params(params: dict[str, Any]) -> UnderstandingParams:
    """The engine's understanding parameters from a job's resolved parameters (prompt = the question)."""
    return UnderstandingParams(
        question=params["prompt"],
        max_tokens=params["thinking"]["max_tokens"],
        temperature=params["thinking"]["temperature"],
        seed=params["seed"],
        think=params["mode"] == "think",
    )


def _api_field(name: str) -> str:
    """The request's name of an engine or limit field."""
    return {
        "max_think_tokens": "thinking.max_tokens",
        "max_tokens": "thinking.max_tokens",
        "temperature": "thinking.temperature",
        "question": "prompt",
    }.get(name, name)


def generation_params(params: dict[str, Any]) -> GenerationParams:
    """The engine's parameters from a job's resolved parameters."""
    guidance = tuple(RoundGuidance(**dict(g, interval=tuple(g["interval"]))) for g in params["guidance"])
    return GenerationParams(
        prompt=params["prompt"],
        mode=params["mode"],
        rounds=params["rounds"],
        width=params["width"],
        height=params["height"],
        steps=params["steps"],
        seed=params["seed"],
        max_think_tokens=params["thinking"]["max_tokens"],
        temperature=params["thinking"]["temperature"],
        guidance=guidance,
        edit=bool(params.get("edit")),
        cache=StepCacheParams(**params["cache"]) if params.get("cache") else None,
        previews=int(params.get("previews", 0)),
        preview_decoder=params.get("preview_decoder", "fast"),
    )


def new_job(
    params: dict[str, Any], owner: str, image_b64: bool, job_id: str | None = None, inputs: InputImages | None = None
) -> JobRecord:
    return JobRecord(
        id=job_id or new_job_id(),
        params=params,
        owner=owner,
        created_at=time.time(),
        options={"image_b64": image_b64},
        inputs=inputs.b64 if inputs else [],
    )


# -- images -----------------------------------------------------------------------------------------------


def image_name(round_index: int, rounds: int) -> str:
    """The name an image is announced under: final, draft (when it is the only one), round-N otherwise."""
    if round_index == rounds:
        return "final"
    return "draft" if rounds == 2 else f"round-{round_index}"


def image_round(name: str, rounds: int) -> int | None:
    """Which round an image name means for a job of `rounds` image rounds (draft: the latest draft)."""
    if name == "final":
        return rounds
    if name == "draft":
        return rounds - 1 if rounds >= 2 else None
    if name.startswith("round-") and name[6:].isdigit():
        k = int(name[6:])
        return k if 1 <= k <= rounds else None
    return None


def job_path(job_id: str) -> str:
    return f"/v1/generations/{job_id}"


def image_url(job_id: str, name: str) -> str:
    return f"{job_path(job_id)}/images/{name}"


# -- the public view -----------------------------------------------------------------------------------


def job_public(job: JobRecord, position: int | None = None) -> JobPublic:
    rounds = job.image_rounds
    images = [
        dict(img, name=image_name(img["round"], rounds), url=image_url(job.id, image_name(img["round"], rounds)))
        for img in job.images
    ]
    timings = dict(job.timings)
    if job.started_at is not None:
        timings["queued_seconds"] = max(0.0, job.started_at - job.created_at)
    return JobPublic(
        id=job.id,
        status=job.status,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        queue_position=position if job.status == "queued" else None,
        attempt=job.attempt,
        worker=job.worker or None,
        cancel_requested=job.cancel and not job.terminal,
        params=job.params,
        texts=[TextOut(**t) for t in job.texts],
        images=images,
        timings=timings,
        answer=job.answer,
        usage=job.usage,
        error=job.error,
        links=JobLinks(self=job_path(job.id), events=f"{job_path(job.id)}/events"),
    )
