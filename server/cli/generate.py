"""`irg generate PROMPT`: run one trajectory on this machine and write its images and record."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from irg_core.defaults import DefaultsError, ModeDefaults
from irg_core.params import GenerationParams, ParamError, RoundGuidance, StepCacheParams, round_guidance
from server.cli.common import add_model_options, open_engine, show_weights_log
from server.cli.errors import CommandError
from server.defaults import serving_defaults


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="run one trajectory and write round-N.png + trajectory.json")
    p.add_argument("prompt", help="the prompt, or with --image the edit instruction")
    add_model_options(p)
    add_generation_options(p)
    p.add_argument(
        "--image",
        type=Path,
        metavar="IN.png",
        help="edit this image (PNG, JPEG or WebP); the output size follows it, as in the official code",
    )
    p.add_argument("--out", type=Path, default=Path("out"), help="output directory (default: ./out)")
    p.add_argument("--save-tensors", action="store_true", help="also write tensors.safetensors (noise, latents)")
    p.add_argument(
        "--previews",
        type=int,
        default=0,
        metavar="N",
        help="write N previews per image while it is denoised to OUT/previews/ (default 0)",
    )
    p.add_argument(
        "--preview-decoder",
        choices=("fast", "vae"),
        default="fast",
        help="fast: linear latent->RGB map (default); vae: full VAE decode",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("irg", "think", "direct"), default="irg")
    p.add_argument("--rounds", type=int, default=2, help="image rounds of mode irg (>= 2)")
    model = "default: the model's serving default for the mode (see docs/server.md)"
    p.add_argument("--width", type=int, default=None, help=f"pixels ({model}; recipe 1024; not with --image)")
    p.add_argument("--height", type=int, default=None, help=f"pixels ({model}; recipe 1024; not with --image)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"timesteps as BAGEL counts them: 50 -> 49 evaluations ({model}; recipe 50)",
    )
    p.add_argument("--seed", type=int, default=None, help="default: random (always reported)")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help=f"thought sampling temperature, 0 = greedy ({model}; recipe: 0.3 for irg, 0 otherwise)",
    )
    p.add_argument(
        "--max-think-tokens",
        type=int,
        default=None,
        help=f"tokens generated per thought at most ({model}; recipe: 4095 for irg, 999 otherwise)",
    )
    p.add_argument(
        "--guidance",
        type=Path,
        metavar="FILE.json",
        help='per-round guidance: {"rounds": [{"text_scale": 4, "interval": [0.4, 1], ...}, ...]}',
    )
    p.add_argument("--system-prompt-file", type=Path, help="system prompt (default: the mode's own)")
    p.add_argument(
        "--cache",
        choices=("none", "taylorseer"),
        default="none",
        help="step cache: taylorseer forecasts most denoising steps (faster, not exact; default none)",
    )
    p.add_argument(
        "--cache-options",
        metavar="JSON",
        help='TaylorSeer parameters, e.g. \'{"fresh_threshold": 3, "first_enhance": 5, "max_order": 6}\'',
    )


def read_guidance(path: Path | None, edit: bool = False) -> tuple[RoundGuidance, ...]:
    if path is None:
        return ()
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CommandError(f"--guidance {path}: not readable JSON ({e})") from e
    rounds = data.get("rounds") if isinstance(data, dict) else None
    if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
        raise CommandError(f'--guidance {path}: expected {{"rounds": [{{...}}, ...]}}')
    known = {f.name for f in fields(RoundGuidance)}
    out = []
    for i, r in enumerate(rounds):
        unknown = set(r) - known
        if unknown:
            raise CommandError(f"--guidance {path}: round {i + 1} has unknown keys {sorted(unknown)}")
        try:
            g = round_guidance(i + 1, r, edit)
            if len(g.interval) != 2:
                raise ValueError("interval needs two numbers")
            out.append(g)
        except (TypeError, ValueError) as e:
            raise CommandError(f"--guidance {path}: round {i + 1}: {e}") from e
    return tuple(out)


def model_defaults(args: argparse.Namespace) -> ModeDefaults:
    """The serving defaults of the model the options name, for the chosen mode."""
    try:
        defaults = serving_defaults(args.model_dir, dummy=getattr(args, "dummy_weights", None) is not None)
    except DefaultsError as e:
        raise CommandError(str(e)) from e
    return defaults.for_mode(args.mode)


def params_from_args(args: argparse.Namespace) -> GenerationParams:
    system = None
    if args.system_prompt_file is not None:
        system = args.system_prompt_file.read_text("utf-8")
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    edit = getattr(args, "image", None) is not None
    if edit and (args.width is not None or args.height is not None):
        raise CommandError(
            "--width/--height: an edit's output size follows the input image (the VAE transform's "
            "resize of it, as in the official code); leave them out with --image"
        )
    d = model_defaults(args)

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return GenerationParams(
        prompt=args.prompt,
        mode=args.mode,
        rounds=args.rounds,
        width=pick(args.width, d.width),
        height=pick(args.height, d.height),
        steps=pick(args.steps, d.steps),
        seed=seed,
        max_think_tokens=pick(args.max_think_tokens, d.max_think_tokens),
        temperature=pick(args.temperature, d.temperature),
        guidance=read_guidance(args.guidance, edit),
        system_prompt=system,
        edit=edit,
        cache=read_cache(args),
    ).resolved()


def read_image(path: Path):  # -> PIL.Image.Image
    """An input image file through the server's input rules (format, limits, EXIF, RGB as the official code)."""
    from server.inputs import ImageInputError, decode_image

    try:
        data = path.read_bytes()
    except OSError as e:
        raise CommandError(f"--image {path}: cannot read ({e.strerror or e})") from e
    try:
        return decode_image(data)
    except ImageInputError as e:
        raise CommandError(f"--image {path}: {e.message}") from e


def read_cache(args: argparse.Namespace) -> StepCacheParams | None:
    options = getattr(args, "cache_options", None)
    if getattr(args, "cache", "none") == "none":
        if options:
            raise CommandError("--cache-options needs --cache taylorseer")
        return None
    try:
        extra = json.loads(options) if options else {}
    except json.JSONDecodeError as e:
        raise CommandError(f"--cache-options: not JSON ({e})") from e
    if not isinstance(extra, dict):
        raise CommandError("--cache-options: expected a JSON object")
    try:
        return StepCacheParams.from_dict({"method": args.cache, **extra})
    except (ParamError, TypeError) as e:
        raise CommandError(f"--cache-options: {e}") from e


class Progress:
    """A tqdm bar per stage (thought tokens, denoising steps), on stderr. A thought's bar counts tokens (each
    delta event says how many so far) and ends at 100 % of the tokens the thought had: `max_tokens`, or fewer
    when it ended on its own."""

    def __init__(self, enabled: bool, max_tokens: int):
        self.enabled, self.max_tokens = enabled, max_tokens
        self.bar: Any = None
        self.key: tuple[str, int] | None = None

    def __call__(self, event: Any) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        kind, data = event.type, event.data
        stage = kind.split(".")[0]
        key = (stage, data.get("round", 0))
        if kind.endswith(".delta") or kind == "image.progress":
            if key != self.key:
                self.close()
                total = data.get("steps") if stage == "image" else self.max_tokens
                unit = "step" if stage == "image" else "tok"
                self.bar = tqdm(total=total, desc=f"{stage} {key[1]}", unit=unit, file=sys.stderr, leave=True)
                self.key = key
            done = data.get("step") if stage == "image" else data.get("tokens", self.bar.n + 1)
            self.bar.update(max(0, done - self.bar.n))
        elif kind.endswith(".done"):
            if self.bar is not None and key == self.key and "tokens" in data:
                self.bar.total = data["tokens"]  # the thought's length: shorter than the limit if it ended
                self.bar.update(data["tokens"] - self.bar.n)
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.key = None, None


class PreviewWriter:
    """Writes each `image.preview` to DIR/round-K-step-SSS.jpg, passing every event on."""

    def __init__(self, directory: Path, then: Any):
        self.dir, self.then = directory, then
        self.written: list[Path] = []

    def __call__(self, event: Any) -> None:
        if event.type == "image.preview":
            from server.publish import encode_preview

            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / f"round-{event.data['round']}-step-{event.data['step']:03d}.jpg"
            path.write_bytes(encode_preview(event.image))
            self.written.append(path)
        self.then(event)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from irg_core.trajectory import run_trajectory

    params = replace(params_from_args(args), previews=args.previews, preview_decoder=args.preview_decoder)
    try:
        params.validate()
    except ParamError as e:
        raise CommandError(f"--{e.field.replace('_', '-')}: {e.message}") from e
    show_weights_log()
    images = [read_image(args.image)] if args.image is not None else []
    engine = open_engine(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(not args.quiet, params.max_think_tokens)
    on_event = PreviewWriter(out / "previews", progress) if params.previews else progress
    result = run_trajectory(engine, params, on_event=on_event, keep_tensors=args.save_tensors, images=images)
    progress.close()
    for r in result.rounds:
        Image.fromarray(r.image).save(out / f"round-{r.index}.png")
    record = trajectory_record(result, engine)
    (out / "trajectory.json").write_text(json.dumps(record, indent=2, ensure_ascii=False), "utf-8")
    if args.save_tensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in result.tensors.items()}, str(out / "tensors.safetensors"))
    print(f"seed {params.seed}: {len(result.rounds)} image(s) in {result.total_seconds:.1f} s -> {out}")
    return 0


def trajectory_record(result: Any, engine: Any) -> dict[str, Any]:
    p = result.params
    return {
        "prompt": p.prompt,
        "mode": p.mode,
        "edit": p.edit,
        "seed": p.seed,
        "width": p.width,
        "height": p.height,
        "steps": p.steps,
        "temperature": p.temperature,
        "max_think_tokens": p.max_think_tokens,
        "cache": p.cache.to_dict() if p.cache is not None else None,
        "previews": p.previews,
        "preview_decoder": p.preview_decoder,
        "rounds": [
            {
                "round": r.index,
                "kind": r.kind,
                "text": r.text,
                "token_ids": r.token_ids,
                "guidance": r.guidance.to_dict(),
                "truncated": r.truncated,
                "denoising": denoising_counts(result, r.index),
                "image": f"round-{r.index}.png",
            }
            for r in result.rounds
        ],
        "timings": [asdict(s) for s in result.stages],
        "total_seconds": result.total_seconds,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
    }


COUNT_KEYS = ("model_evaluations", "branch_evaluations", "forecast_steps", "forecast_branch_calls")


def denoising_counts(result: Any, round_index: int) -> dict[str, int]:
    """A round's denoising steps, the model evaluations that ran and those the step cache forecast."""
    stage = next((s for s in result.stages if s.stage == "image" and s.round == round_index), None)
    if stage is None:
        return {}
    return {"steps": stage.steps, **{k: getattr(stage, k) for k in COUNT_KEYS}}
