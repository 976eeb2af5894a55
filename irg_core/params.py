"""Request-time knobs of a generation, and the events a trajectory reports.

Pure Python (no torch): the HTTP API imports this module to resolve defaults and validate requests,
and must stay light.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from irg_core.defaults import recipe_defaults

Mode = Literal["irg", "think", "direct"]
Renorm = Literal["global", "channel", "text_channel"]
MODES: tuple[str, ...] = ("irg", "think", "direct")
RENORMS: tuple[str, ...] = ("global", "channel", "text_channel")

# Limits that hold for every BAGEL checkpoint; model-specific ones (largest side) come from the config.
MAX_ROUNDS = 8
MAX_STEPS = 200
MAX_THINK_TOKENS = 4096
MAX_GUIDANCE_SCALE = 100.0
MAX_TIMESTEP_SHIFT = 100.0


class ParamError(ValueError):
    """A generation parameter is out of range; `field` names it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(frozen=True, slots=True)
class RoundGuidance:
    """Guidance of one image round (BAGEL `generate_image` arguments)."""

    text_scale: float = 4.0
    image_scale: float = 1.0
    interval: tuple[float, float] = (0.4, 1.0)
    renorm: str = "global"
    renorm_min: float = 0.0
    timestep_shift: float = 3.0

    def validate(self, where: str) -> None:
        for name in ("text_scale", "image_scale", "renorm_min", "timestep_shift"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ParamError(f"{where}.{name}", "must be a finite number")
        if not 0.0 <= self.text_scale <= MAX_GUIDANCE_SCALE:
            raise ParamError(f"{where}.text_scale", f"must be within [0, {MAX_GUIDANCE_SCALE}]")
        if not 0.0 <= self.image_scale <= MAX_GUIDANCE_SCALE:
            raise ParamError(f"{where}.image_scale", f"must be within [0, {MAX_GUIDANCE_SCALE}]")
        if not 0.0 <= self.renorm_min <= 1.0:
            raise ParamError(f"{where}.renorm_min", "must be within [0, 1]")
        if not 0.0 < self.timestep_shift <= MAX_TIMESTEP_SHIFT:
            raise ParamError(f"{where}.timestep_shift", f"must be within (0, {MAX_TIMESTEP_SHIFT}]")
        if self.renorm not in RENORMS:
            raise ParamError(f"{where}.renorm", f"must be one of {', '.join(RENORMS)}")
        lo, hi = self.interval
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi <= 1.0):
            raise ParamError(f"{where}.interval", "must be [lo, hi] with 0 <= lo <= hi <= 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the interval as a list)."""
        return dict(asdict(self), interval=list(self.interval))


# API.md defaults: round 1 text 4.0 on [0.4, 1] with global renorm; later rounds text 2.0 and image 2.0
# (the paper's dual guidance) on [0, 1] with text_channel renorm; shift 3 everywhere.
FIRST_ROUND = RoundGuidance(4.0, 1.0, (0.4, 1.0), "global", 0.0, 3.0)
LATER_ROUND = RoundGuidance(2.0, 2.0, (0.0, 1.0), "text_channel", 0.0, 3.0)
# An edit's first round: BAGEL inference.ipynb "Editing" (text 4.0, image 2.0 on [0, 1], text_channel renorm).
EDIT_ROUND = RoundGuidance(4.0, 2.0, (0.0, 1.0), "text_channel", 0.0, 3.0)


def default_guidance(round_index: int, edit: bool = False) -> RoundGuidance:
    """Default guidance of image round `round_index` (1-based); `edit`: the trajectory edits an input image."""
    if round_index == 1:
        return EDIT_ROUND if edit else FIRST_ROUND
    return LATER_ROUND


def round_guidance(round_index: int, overrides: dict[str, Any], edit: bool = False) -> RoundGuidance:
    """Round `round_index`'s default guidance with the keys of `overrides` replaced."""
    merged = dict(asdict(default_guidance(round_index, edit)), **overrides)
    merged["interval"] = tuple(float(v) for v in merged["interval"])
    return RoundGuidance(**merged)


# Step caching (opt-in). The official TaylorSeer parameters and defaults: Bagel @ 056b5fd5
# modeling/cache_utils/taylorseer.py `cache_init` (hard-coded there; `taylor_cache` True and `fresh_ratio` 0.0
# are the only path it takes, so they are fixed here, not knobs).
CACHE_METHODS: tuple[str, ...] = ("taylorseer",)
MAX_CACHE_ORDER = 10


@dataclass(frozen=True, slots=True)
class StepCacheParams:
    """`cache: {"method": "taylorseer", "fresh_threshold": 3, "first_enhance": 5, "max_order": 6}`."""

    method: str = "taylorseer"
    fresh_threshold: int = 3  # after the first phase, every fresh_threshold-th call of a branch runs the model
    first_enhance: int = 5  # the first first_enhance calls of a branch run the model
    max_order: int = 6  # highest Taylor order of the forecast

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepCacheParams:
        """From a request's `cache` object; unknown keys and wrong types are a ParamError naming them."""
        if not isinstance(d, dict):
            raise ParamError("cache", 'must be an object like {"method": "taylorseer"}')
        unknown = sorted(set(d) - {"method", "fresh_threshold", "first_enhance", "max_order"})
        if unknown:
            raise ParamError(
                f"cache.{unknown[0]}",
                "unknown cache parameter (known: method, fresh_threshold, first_enhance, max_order)",
            )
        out = cls(**d)
        out.validate()
        return out

    def validate(self) -> None:
        if self.method not in CACHE_METHODS:
            raise ParamError("cache.method", f"must be one of {', '.join(CACHE_METHODS)}")
        for name, lo, hi in (
            ("fresh_threshold", 1, MAX_STEPS),
            ("first_enhance", 1, MAX_STEPS),
            ("max_order", 0, MAX_CACHE_ORDER),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise ParamError(f"cache.{name}", f"must be an integer within [{lo}, {hi}]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Live previews of an image while it is denoised: how many per image (0 = off) and how they are drawn.
PREVIEW_DECODERS: tuple[str, ...] = ("fast", "vae")
DEFAULT_PREVIEWS = 4  # the HTTP API's default per image (the library and CLI default to none)
MAX_PREVIEWS = 50


def image_rounds(mode: str, rounds: int) -> int:
    """How many images a trajectory draws."""
    return rounds if mode == "irg" else 1


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Everything that determines one trajectory; with the seed fixed, the result is reproducible."""

    prompt: str
    mode: str = "irg"
    rounds: int = 2
    width: int = 1024
    height: int = 1024
    steps: int = 50
    seed: int = 0
    max_think_tokens: int | None = None  # None: the mode's recipe default (irg_core.defaults)
    temperature: float | None = None  # None: the mode's recipe default (irg 0.3, think/direct greedy)
    guidance: tuple[RoundGuidance, ...] = ()
    system_prompt: str | None = None  # None: the mode's own prompt (irg_core/data)
    # An edit: the prompt is an instruction about an input image given to `run_trajectory(images=...)`;
    # width/height are then derived from that image (the VAE transform's resize, as the official code does).
    edit: bool = False
    cache: StepCacheParams | None = None  # None: exact (every step runs the model)
    previews: int = 0  # x0 previews per image while denoising (0 = off)
    preview_decoder: str = "fast"  # fast: linear latent -> RGB map; vae: the full VAE decode

    def resolved(self) -> GenerationParams:
        """Fill guidance per image round and the thought knobs left None with the mode's defaults; validate."""
        n = image_rounds(self.mode, self.rounds) if self.mode in MODES else 0
        given = list(self.guidance)
        full = tuple(given[i] if i < len(given) else default_guidance(i + 1, self.edit) for i in range(n))
        out = replace(self, guidance=full)
        if self.mode in MODES and (self.max_think_tokens is None or self.temperature is None):
            recipe = recipe_defaults(self.mode)
            out = replace(
                out,
                max_think_tokens=recipe.max_think_tokens if self.max_think_tokens is None else self.max_think_tokens,
                temperature=recipe.temperature if self.temperature is None else self.temperature,
            )
        out.validate()
        return out

    def validate(self, max_side: int | None = None) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ParamError("prompt", "must be a non-empty string")
        if self.mode not in MODES:
            raise ParamError("mode", f"must be one of {', '.join(MODES)}")
        if self.mode == "irg" and not 2 <= self.rounds <= MAX_ROUNDS:
            raise ParamError("rounds", f"must be within [2, {MAX_ROUNDS}] for mode irg")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                raise ParamError(name, "must be a positive multiple of 16")
            if max_side is not None and value > max_side:
                raise ParamError(name, f"must be at most {max_side} for this model")
        if not 2 <= self.steps <= MAX_STEPS:
            raise ParamError("steps", f"must be within [2, {MAX_STEPS}]")
        if not 0 <= self.seed < 2**63:
            raise ParamError("seed", "must be within [0, 2^63)")
        if self.max_think_tokens is None or not 1 <= self.max_think_tokens <= MAX_THINK_TOKENS:
            raise ParamError("max_think_tokens", f"must be within [1, {MAX_THINK_TOKENS}]")
        if self.temperature is None or not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 10.0):
            raise ParamError("temperature", "must be within [0, 10]")
        for i, g in enumerate(self.guidance):
            g.validate(f"guidance[{i}]")
        self._validate_extras()

    def _validate_extras(self) -> None:
        """The step cache and the previews."""
        if self.cache is not None:
            if not isinstance(self.cache, StepCacheParams):
                raise ParamError("cache", "must be StepCacheParams")
            self.cache.validate()
        if (
            isinstance(self.previews, bool)
            or not isinstance(self.previews, int)
            or not 0 <= self.previews <= MAX_PREVIEWS
        ):
            raise ParamError("previews", f"must be an integer within [0, {MAX_PREVIEWS}]")
        if self.preview_decoder not in PREVIEW_DECODERS:
            raise ParamError("preview_decoder", f"must be one of {', '.join(PREVIEW_DECODERS)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["guidance"] = [g.to_dict() for g in self.guidance]
        d["cache"] = self.cache.to_dict() if self.cache is not None else None
        return d


MAX_ANSWER_TOKENS = 8192


@dataclass(frozen=True, slots=True)
class UnderstandingParams:
    """An image-understanding request: images (given to `run_understanding`) plus a question -> a text answer.

    `think` puts BAGEL's `VLM_THINK_SYSTEM_PROMPT` first (the official `think=True, understanding_output=True`);
    `max_tokens` counts generated tokens (the official `max_think_token_n` minus its start token).
    """

    question: str
    max_tokens: int = 512
    temperature: float = 0.0
    seed: int = 0
    think: bool = False
    system_prompt: str | None = None  # None: VLM_THINK_SYSTEM_PROMPT with think, nothing without

    def validate(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise ParamError("question", "must be a non-empty string")
        if not 1 <= self.max_tokens <= MAX_ANSWER_TOKENS:
            raise ParamError("max_tokens", f"must be within [1, {MAX_ANSWER_TOKENS}]")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 10.0):
            raise ParamError("temperature", "must be within [0, 10]")
        if not 0 <= self.seed < 2**63:
            raise ParamError("seed", "must be within [0, 2^63)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class EngineEvent:
    """One stage change of a trajectory, named as in API.md (`thinking.delta`, `image.done`, ...).

    `data` is JSON-ready; `image` (HWC uint8 numpy array) is set on `image.done` only.
    """

    type: str
    data: dict[str, Any]
    image: Any = None


@dataclass(slots=True)
class RoundResult:
    """What one image round produced (its text is the plan or the reflection before the image)."""

    index: int
    kind: str  # draft | final
    text: str | None
    token_ids: list[int]
    guidance: RoundGuidance
    image: Any  # HWC uint8 numpy array
    truncated: bool = False  # the thought hit max_think_tokens without <|im_end|>


@dataclass(slots=True)
class StageTiming:
    """Wall time of one stage: `prefill`, `thinking`, `reflection`, `image` (denoising), `decode` (VAE
    decode), `reencode` (an image put back into the context through the VAE and the ViT)."""

    stage: str
    round: int
    seconds: float
    tokens: int = 0  # decoded tokens (thinking / reflection)
    steps: int = 0  # denoising steps (image)
    model_evaluations: int = 0  # image: steps at which the model ran (= steps without a step cache)
    branch_evaluations: int = 0  # image: CFG-branch forward passes that ran
    forecast_steps: int = 0  # image: steps whose every branch the step cache forecast
    forecast_branch_calls: int = 0  # image: CFG-branch calls the step cache forecast


@dataclass(slots=True)
class TrajectoryResult:
    params: GenerationParams
    rounds: list[RoundResult] = field(default_factory=list)
    stages: list[StageTiming] = field(default_factory=list)
    total_seconds: float = 0.0
    peak_memory_bytes: int = 0  # accelerator memory high-water mark (0 on CPU)
    tensors: dict[str, Any] = field(default_factory=dict)  # round{k}.init_noise / round{k}.final_latent
