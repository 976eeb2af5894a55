"""BAGEL's resize rule as pure arithmetic (no torch): the HTTP API uses it to tell an edit's output size
before any worker sees the image. `irg_core.transforms.ImageTransform` applies the same rule."""

from __future__ import annotations

MAX_PIXELS = 14 * 14 * 9 * 1024  # BAGEL's default max_pixels


def _divisible(value: float, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def resize_target(
    width: int, height: int, max_size: int, min_size: int, stride: int, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """(width, height) after `MaxLongEdgeMinShortEdgeResize`; `round` is Python's (half to even), as upstream."""

    def apply(w: float, h: float, scale: float) -> tuple[int, int]:
        return _divisible(round(w * scale), stride), _divisible(round(h * scale), stride)

    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    w, h = apply(width, height, scale)
    if w * h > max_pixels:
        w, h = apply(w, h, max_pixels / (w * h))  # an area ratio used as a linear scale, as upstream
    if max(w, h) > max_size:
        w, h = apply(w, h, max_size / max(w, h))
    return w, h


def edit_output_size(width: int, height: int) -> tuple[int, int]:
    """An edit's output size for a `width` x `height` input: the VAE transform's (1024, 512, 16) resize of it."""
    return resize_target(width, height, 1024, 512, 16)
