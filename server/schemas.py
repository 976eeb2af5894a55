"""The HTTP API's request and response models (the OpenAPI schema is generated from them).

Request models forbid unknown fields, coerce nothing (`strict`) and refuse NaN/inf. Defaults come from
`irg_core.params`, the one source of generation defaults; limits that depend on the deployment (largest side,
prompt length ...) are checked against the settings in `server.jobs.build_params`.
"""

from __future__ import annotations

from dataclasses import fields as dataclass_fields
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from irg_core.defaults import RECIPE
from irg_core.params import (
    DEFAULT_PREVIEWS,
    FIRST_ROUND,
    LATER_ROUND,
    MAX_CACHE_ORDER,
    MAX_GUIDANCE_SCALE,
    MAX_PREVIEWS,
    MAX_ROUNDS,
    MAX_STEPS,
    MAX_THINK_TOKENS,
    MAX_TIMESTEP_SHIFT,
    GenerationParams,
    StepCacheParams,
)
from server.settings import BAGEL_MAX_SIDE

DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclass_fields(GenerationParams)}
IMAGE_NAME_PATTERN = rf"^(draft|final|round-[1-{MAX_ROUNDS}])$"
MAX_SEED = 2**63 - 1
MAX_PROMPT_SCHEMA = 100_000  # the deployment's own bound (IRG_MAX_PROMPT_CHARS) is checked after parsing
MAX_IMAGE_B64 = 64 * 1024 * 1024  # the deployment's own bounds (IRG_MAX_IMAGE_BYTES ...) are checked after parsing

# What each bounded field allows, named in 422 messages (keyed by the field's own name).
ALLOWED: dict[str, str] = {
    "prompt": "a non-empty string",
    "mode": "one of irg, think, direct",
    "rounds": f"an integer within [2, {MAX_ROUNDS}] for mode irg (1 for think and direct)",
    "width": f"a multiple of 16 within [16, {BAGEL_MAX_SIDE}]",
    "height": f"a multiple of 16 within [16, {BAGEL_MAX_SIDE}]",
    "steps": f"an integer within [2, {MAX_STEPS}]",
    "seed": f"an integer within [0, {MAX_SEED}]",
    "max_tokens": f"an integer within [1, {MAX_THINK_TOKENS}]",
    "temperature": "a finite number within [0, 10]",
    "text_scale": f"a finite number within [0, {MAX_GUIDANCE_SCALE}]",
    "image_scale": f"a finite number within [0, {MAX_GUIDANCE_SCALE}]",
    "interval": "[lo, hi] with 0 <= lo <= hi <= 1",
    "renorm": "one of global, channel, text_channel",
    "renorm_min": "a finite number within [0, 1]",
    "timestep_shift": f"a finite number within (0, {MAX_TIMESTEP_SHIFT}]",
    "guidance": f"a list of at most {MAX_ROUNDS} per-round objects",
    "size": "auto or WIDTHxHEIGHT, each a multiple of 16 within [16, 1024]",
    "partial_images": "an integer within [0, 3]",
    "output_compression": "an integer within [0, 100]",
    "previews": f"an integer within [0, {MAX_PREVIEWS}]",
    "preview_decoder": "one of fast, vae",
    "method": "taylorseer",
    "fresh_threshold": f"an integer within [1, {MAX_STEPS}]",
    "first_enhance": f"an integer within [1, {MAX_STEPS}]",
    "max_order": f"an integer within [0, {MAX_CACHE_ORDER}]",
}
CACHE_DEFAULTS = StepCacheParams()


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be blank")
    return v


Prompt = Annotated[
    str,
    Field(min_length=1, max_length=MAX_PROMPT_SCHEMA, description="what to draw (non-empty)"),
    AfterValidator(_not_blank),
]


class Request(BaseModel):
    """Base of request bodies: unknown fields, coercions and NaN/inf are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ThinkingOptions(Request):
    """How the thoughts (the plan, and each reflection) are decoded."""

    max_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_THINK_TOKENS,
        description=(
            f"tokens decoded per thought at most (default: the model's for the mode; the recipe's are "
            f"{RECIPE.for_mode('irg').max_think_tokens} for irg, {RECIPE.for_mode('think').max_think_tokens} for "
            "think; GET /v1/defaults; capped by the server's limit)"
        ),
    )
    temperature: float | None = Field(
        None,
        ge=0.0,
        le=10.0,
        description=(
            f"0 = greedy decoding (default: the model's for the mode; the recipe's are "
            f"{RECIPE.for_mode('irg').temperature} for irg, greedy for think; GET /v1/defaults)"
        ),
    )


class GuidanceOptions(Request):
    """Guidance of one image round; a field left out takes that round's default."""

    text_scale: float | None = Field(
        None,
        ge=0.0,
        le=MAX_GUIDANCE_SCALE,
        description=f"text CFG scale (default {FIRST_ROUND.text_scale} in round 1, {LATER_ROUND.text_scale} later)",
    )
    image_scale: float | None = Field(
        None,
        ge=0.0,
        le=MAX_GUIDANCE_SCALE,
        description=f"image CFG scale (default {FIRST_ROUND.image_scale} in round 1, "
        f"{LATER_ROUND.image_scale} later: the paper's dual guidance)",
    )
    interval: list[Annotated[float, Field(ge=0.0, le=1.0)]] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description=f"[lo, hi] part of the schedule where CFG applies (default {list(FIRST_ROUND.interval)} in "
        f"round 1, {list(LATER_ROUND.interval)} later)",
    )
    renorm: Literal["global", "channel", "text_channel"] | None = Field(
        None, description=f"CFG renormalisation (default {FIRST_ROUND.renorm} in round 1, {LATER_ROUND.renorm} later)"
    )
    renorm_min: float | None = Field(None, ge=0.0, le=1.0, description="lower clamp of the renorm factor (default 0)")
    timestep_shift: float | None = Field(
        None, gt=0.0, le=MAX_TIMESTEP_SHIFT, description=f"schedule shift (default {FIRST_ROUND.timestep_shift})"
    )

    @field_validator("interval")
    @classmethod
    def _ordered(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and v[0] > v[1]:
            raise ValueError("lo must not exceed hi")
        return v


class CacheOptions(Request):
    """Opt-in step caching (not exact): TaylorSeer as the official BAGEL code runs it, official defaults."""

    method: Literal["taylorseer"] = Field(
        description="taylorseer: forecast most denoising steps from the last "
        "computed ones (Taylor expansion per CFG branch)"
    )
    fresh_threshold: int = Field(
        CACHE_DEFAULTS.fresh_threshold,
        ge=1,
        le=MAX_STEPS,
        description="after the first phase, every n-th call of a branch runs the model",
    )
    first_enhance: int = Field(
        CACHE_DEFAULTS.first_enhance, ge=1, le=MAX_STEPS, description="the first n calls of a branch run the model"
    )
    max_order: int = Field(CACHE_DEFAULTS.max_order, ge=0, le=MAX_CACHE_ORDER, description="highest Taylor order")


class GenerationOptions(Request):
    """The knobs of a trajectory, shared by `/v1/generations` and the IRG extensions of the OpenAI route."""

    mode: Literal["irg", "think", "direct"] = Field(
        "irg", description="irg: think, draft, reflect, refine; think: plan then one image; direct: one image"
    )
    rounds: int | None = Field(
        None, ge=1, le=MAX_ROUNDS, description=f"image rounds (default {DEFAULTS['rounds']} for irg; 1 otherwise)"
    )
    steps: int | None = Field(
        None,
        ge=2,
        le=MAX_STEPS,
        description=(
            f"denoising timesteps per image (default: the model's, recipe {RECIPE.for_mode('irg').steps}; capped "
            "by the server's limit; BAGEL counts 50 -> 49 model evaluations)"
        ),
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random seed; drawn when left out, always reported")
    thinking: ThinkingOptions = Field(default_factory=ThinkingOptions, description="thought decoding")
    guidance: list[GuidanceOptions] | None = Field(
        None, max_length=MAX_ROUNDS, description="per image round, in order; missing rounds: defaults"
    )
    cache: CacheOptions | None = Field(None, description="step caching (faster, not exact); left out: exact")
    previews: int = Field(
        DEFAULT_PREVIEWS,
        ge=0,
        le=MAX_PREVIEWS,
        description=("image.preview events per image while it is denoised (ephemeral: live watchers only; 0 = off)"),
    )
    preview_decoder: Literal["fast", "vae"] = Field(
        "fast", description="fast: a linear latent->RGB map (microseconds); vae: the full VAE decode"
    )


class GenerateRequest(GenerationOptions):
    """`POST /v1/generations` (JSON, or multipart: a `request` part with this JSON plus `image` file parts)."""

    task: Literal["generate", "understand"] = Field(
        "generate",
        description="generate: an image (an edit when `images` holds one); understand: answer the "
        "prompt (a question) about `images`, streamed as answer.delta / answer.done",
    )
    images: list[Annotated[str, Field(max_length=MAX_IMAGE_B64)]] | None = Field(
        None,
        max_length=16,
        description="input images: base64 PNG/JPEG/WebP or data:image/...;base64 URLs "
        "(never fetched from the web); one to edit, one or more to understand",
    )
    prompt: Prompt
    width: int | None = Field(
        None,
        ge=16,
        le=BAGEL_MAX_SIDE,
        multiple_of=16,
        description=(
            f"pixels (default: the model's, recipe {RECIPE.for_mode('irg').width}; capped by the server's largest side)"
        ),
    )
    height: int | None = Field(
        None,
        ge=16,
        le=BAGEL_MAX_SIDE,
        multiple_of=16,
        description=(
            f"pixels (default: the model's, recipe {RECIPE.for_mode('irg').height}; capped by the server's largest "
            "side)"
        ),
    )
    stream: bool = Field(False, description="answer with the job's SSE stream instead of 202 + job")
    wait: bool = Field(False, description="block until the job ends (bounded by the server) and return it")
    image_b64: bool = Field(False, description="image.done events also carry the PNG, base64-encoded, in `b64`")


# -- responses -----------------------------------------------------------------------------------------


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


class ResolvedGuidance(BaseModel):
    text_scale: float
    image_scale: float
    interval: list[float]
    renorm: str
    renorm_min: float
    timestep_shift: float


class ResolvedThinking(BaseModel):
    max_tokens: int
    temperature: float


class ModeDefaultsOut(BaseModel):
    width: int
    height: int
    steps: int
    max_think_tokens: int
    temperature: float


class DefaultsOut(BaseModel):
    """What a request leaves out resolves to, per mode, on this server's model."""

    source: str = Field(description="recipe, or the serving-defaults file of the model directory")
    modes: dict[str, ModeDefaultsOut]


class InputImage(BaseModel):
    format: str = Field(description="PNG, JPEG or WEBP")
    width: int = Field(description="after the EXIF orientation")
    height: int
    bytes: int
    sha256: str


class ResolvedParams(BaseModel):
    """The parameters the job runs with, every default filled in; with the seed, the result is reproducible."""

    prompt: str
    mode: str
    rounds: int = Field(description="image rounds (1 for think and direct, 0 for task understand)")
    width: int
    height: int
    steps: int
    seed: int
    thinking: ResolvedThinking
    guidance: list[ResolvedGuidance] = Field(description="one entry per image round")
    task: Literal["generate", "understand"] = "generate"
    edit: bool = Field(False, description="an edit of the input image: width/height follow it")
    inputs: list[InputImage] = Field(default_factory=list, description="the input images, in order")
    cache: dict[str, Any] | None = Field(None, description="the step cache (method and parameters); null: exact")
    previews: int = 0
    preview_decoder: str = "fast"


class TextOut(BaseModel):
    round: int
    kind: Literal["thinking", "reflection"] = Field(description="thinking: the plan (round 1); reflection: later")
    text: str = Field(description="the text so far")
    done: bool
    truncated: bool = Field(False, description="the thought reached max_tokens without ending (cut)")


class ImageOut(BaseModel):
    name: str = Field(description="draft, final or round-N")
    round: int
    kind: Literal["draft", "final"]
    url: str = Field(description="where the PNG is served")
    width: int
    height: int


class AnswerOut(BaseModel):
    text: str = Field(description="the answer so far")
    done: bool
    tokens: int = Field(0, description="tokens decoded (set when done)")


class StageOut(BaseModel):
    stage: str = Field(description="prefill, thinking, reflection, image or reencode")
    round: int
    seconds: float
    tokens: int = Field(0, description="decoded tokens (thinking, reflection)")
    steps: int = Field(0, description="denoising steps (image)")
    model_evaluations: int = Field(0, description="image: steps at which the model ran")
    branch_evaluations: int = Field(0, description="image: CFG-branch forward passes that ran")
    forecast_steps: int = Field(0, description="image: steps the step cache forecast entirely")
    forecast_branch_calls: int = Field(0, description="image: CFG-branch calls the step cache forecast")


class Timings(BaseModel):
    queued_seconds: float | None = Field(None, description="from submission to the (last) start")
    run_seconds: float | None = Field(None, description="the trajectory's wall time")
    stages: list[StageOut] = Field(default_factory=list)


class Usage(BaseModel):
    prompt_tokens: int
    text_tokens: int = Field(description="thinking and reflection tokens decoded")
    image_tokens: int = Field(description="latent tokens generated, over all image rounds")


class ErrorInfo(BaseModel):
    code: str
    message: str


class JobLinks(BaseModel):
    self: str
    events: str


class JobPublic(BaseModel):
    """A generation job as clients see it."""

    id: str
    object: Literal["generation"] = "generation"
    status: JobStatus
    created_at: float = Field(description="Unix time")
    started_at: float | None = None
    finished_at: float | None = None
    queue_position: int | None = Field(None, description="1 = next to run; set while queued")
    attempt: int = Field(0, description="runs started (a run whose worker died is retried)")
    worker: str | None = None
    cancel_requested: bool = False
    params: ResolvedParams
    texts: list[TextOut] = Field(default_factory=list)
    answer: AnswerOut | None = Field(None, description="task understand: the answer")
    images: list[ImageOut] = Field(default_factory=list)
    timings: Timings = Field(default_factory=Timings)
    usage: Usage | None = None
    error: ErrorInfo | None = None
    links: JobLinks


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class WorkerCapacity(BaseModel):
    name: str
    active: int = Field(description="jobs it runs now")
    capacity: int = Field(description="jobs it runs at once at most")
    free: int = Field(description="jobs it can take now")


class ReadyStatus(BaseModel):
    status: Literal["ready", "unavailable"]
    reason: str | None = None
    workers: int = 0
    free_capacity: int = Field(0, description="jobs the ready workers can take now, all together")
    capacity: list[WorkerCapacity] = Field(default_factory=list, description="each ready worker's capacity")
    queue_depth: int | None = None
