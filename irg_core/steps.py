"""The units of model work a step program yields, and what it gets back for each.

A recipe (irg, think, direct, ...) is a generator: it yields one of these at a time and receives the result,
so no recipe owns a loop over the model; the scheduler (`irg_core.scheduler`) decides which forward each unit
rides in. Units that do no model work (`Emit`, `Stamp`, `Free`) are answered at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from irg_core.kv_cache import Context
from irg_core.params import EngineEvent

_serial = itertools.count(1)  # identities for the engine's caches (id() of a freed object is reused)


@dataclass(eq=False, slots=True)
class PrefillText:
    """A causal text segment after `ctx` (rope advances by one per token) -> the extended Context."""

    ctx: Context
    ids: list[int]


@dataclass(eq=False, slots=True)
class PrefillImage:
    """[start, rows, end] as one bidirectional block at a single RoPE position -> the extended Context.
    `gen`: latent (VAE) rows, through the generation expert."""

    ctx: Context
    rows: Tensor
    gen: bool


@dataclass(eq=False, slots=True)
class EncodeVae:
    """An image through the VAE transform and encoder (posterior noise from `eps_seed`) -> (LLM rows, latent)."""

    image: Any
    eps_seed: int


@dataclass(eq=False, slots=True)
class EncodeVit:
    """An image through the ViT transform, SigLIP and the connector -> LLM rows."""

    image: Any


@dataclass(eq=False, slots=True)
class Decoding:
    """One text being generated after `<|im_start|>` from `ctx`: the state the scheduler keeps per sequence.

    `seed` keys the sampling noise (temperature > 0); `step` counts the tokens generated so far."""

    ctx: Context
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    step: int = 0
    room: Context | None = None  # the pool room for the decode rows (allocated by the engine)
    slots: list[int] = field(default_factory=list)
    last: int | None = None  # the previous output (None: the start token goes in)
    uid: int = field(default_factory=lambda: next(_serial))


@dataclass(eq=False, slots=True)
class DecodeStep:
    """One token of `seq` -> (token id, full logits [vocab] if `logits` was asked for, else None)."""

    seq: Decoding
    logits: bool = False


@dataclass(eq=False, slots=True)
class DenoiseLoop:
    """One image round's guidance contexts (cond first) and latent grid; the engine prepares its KV rooms."""

    contexts: list[Context]
    grid_h: int
    grid_w: int
    state: Any = None  # engine-owned: rooms, slots, positions
    uid: int = field(default_factory=lambda: next(_serial))

    @property
    def tokens(self) -> int:
        return self.grid_h * self.grid_w


@dataclass(eq=False, slots=True)
class DenoiseStep:
    """The first `branches` contexts of `loop` (or just those in `which`) queried with latent x [N, 64] at
    timestep t -> (velocities [b, N, 64], pre-final-norm hidden states [b, N, hidden] if `hidden` else None),
    b the number of branches evaluated."""

    loop: DenoiseLoop
    x: Tensor
    t: Tensor
    branches: int
    hidden: bool = False
    which: tuple[int, ...] | None = None  # a subset of the branches (a step cache forecasts the others)

    @property
    def evaluated(self) -> tuple[int, ...]:
        return self.which if self.which is not None else tuple(range(self.branches))


@dataclass(eq=False, slots=True)
class DecodeLatent:
    """A packed latent [N, 64] through the VAE decoder -> (decoder output [1, 3, H, W], HWC uint8 array)."""

    latent: Tensor
    width: int
    height: int
    mode: str = "irg"  # which official script's rounding the decoder follows (irg_core.numerics)


@dataclass(eq=False, slots=True)
class Emit:
    """Hand an event to the trajectory's sink (no model work)."""

    event: EngineEvent


@dataclass(eq=False, slots=True)
class Free:
    """Give back a context's (or a finished decode's / loop's) KV pages now instead of at the end."""

    what: Context | Decoding | DenoiseLoop


@dataclass(eq=False, slots=True)
class Stamp:
    """A point in time on the device's timeline (no synchronisation) -> an opaque mark for `elapsed`."""


Unit = (
    PrefillText | PrefillImage | EncodeVae | EncodeVit | DecodeStep | DenoiseStep | DecodeLatent | Emit | Free | Stamp
)
Program = Generator[Any, Any, Any]
