"""Image preprocessing as BAGEL does it, and the patch layouts between pixels, latents and tokens.

`ImageTransform(max, min, stride)` resizes (PIL bicubic) so that the long side is at most `max`, the short
side at least `min`, both multiples of `stride`, then maps to [-1, 1] (BAGEL `data/transforms.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from irg_core.sizes import MAX_PIXELS, resize_target


@dataclass(frozen=True, slots=True)
class ImageTransform:
    max_size: int
    min_size: int
    stride: int
    max_pixels: int = MAX_PIXELS

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize rule (`irg_core.sizes.resize_target`)."""
        return resize_target(width, height, self.max_size, self.min_size, self.stride, self.max_pixels)

    def resize(self, image: Image.Image) -> Image.Image:
        w, h = self.target_size(*image.size)
        return image.resize((w, h), Image.BICUBIC)

    def __call__(self, image: Image.Image) -> Tensor:
        """PIL RGB image -> [3, H', W'] float32 in [-1, 1]."""
        return to_unit_range(np.asarray(self.resize(image)))


VAE_TRANSFORM = ImageTransform(1024, 512, 16)
VIT_TRANSFORM = ImageTransform(980, 224, 14)


def to_unit_range(pixels: np.ndarray) -> Tensor:
    """HWC uint8 -> CHW float32 in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    x = torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True)).permute(2, 0, 1).float() / 255.0
    return (x - 0.5) / 0.5


def to_uint8(image: Tensor) -> np.ndarray:
    """[1, 3, H, W] decoder output -> HWC uint8, computed in the output's own dtype (bf16 on the GPU path:
    `*0.5+0.5`, clamp and `*255` round to bf16 before the cast, as both official scripts do); the cast
    truncates."""
    x = ((image * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0) * 255).to(torch.uint8)
    return x.cpu().numpy()


def patchify(x: Tensor, p: int) -> Tensor:
    """[C, H, W] -> [(H/p)(W/p), p*p*C], features ordered (py, px, c), patches row-major."""
    c, h, w = x.shape
    x = x.reshape(c, h // p, p, w // p, p)
    return torch.einsum("chpwq->hwpqc", x).reshape(-1, p * p * c)


def unpatchify(tokens: Tensor, h: int, w: int, p: int, c: int) -> Tensor:
    """[h*w, p*p*c] -> [1, c, h*p, w*p] (inverse of `patchify`)."""
    x = tokens.reshape(1, h, w, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(1, c, h * p, w * p)


def grid_position_ids(rows: int, cols: int, grid: int) -> Tensor:
    """Flattened 2-D position ids row * grid + col ("extrapolate": a smaller image uses the top-left)."""
    return (torch.arange(rows)[:, None] * grid + torch.arange(cols)[None, :]).flatten()
