"""Input images as a server must take them: PNG, JPEG or WebP bytes -> a PIL RGB image, limits first.

Every check that can be made without decoding pixels is made before decoding (decompression bombs): the byte
count, the format from the magic bytes, then the size from the header. Only then are the pixels decoded, the
EXIF orientation applied and the image converted to RGB the way the official BAGEL code does
(`data/data_utils.py::pil_img2rgb`: RGBA, or any image with a `transparency` entry, is composited over white;
everything else is `convert("RGB")`). Nothing here fetches a URL. Pure PIL: the HTTP API imports this module.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """What one input image may be. Defaults: 20 MiB, 40 megapixels, 8192 px per side, at least 16 px."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 8192
    min_side: int = 16


class ImageInputError(ValueError):
    """An input image is refused; `status` is 413 (a size limit) or 422 (anything else), `limit` names it."""

    def __init__(self, message: str, status: int = 422, limit: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.limit = limit
        self.field = field


def sniff_format(data: bytes) -> str:
    """PNG / JPEG / WEBP from the magic bytes, or an error that says what the bytes are instead."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        raise ImageInputError("GIF images are not supported; send PNG, JPEG or WebP")
    head = data[:16].lstrip().lower()
    if head.startswith((b"http://", b"https://", b"ftp://", b"file:")):
        raise ImageInputError("image URLs are never fetched; send the image bytes (multipart or base64)")
    if not data:
        raise ImageInputError("the image is empty")
    raise ImageInputError("not a PNG, JPEG or WebP image")


def check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageInputError(
            f"the image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels} pixels",
            413,
            "max_pixels",
        )
    if max(width, height) > limits.max_side:
        raise ImageInputError(
            f"the image is {width}x{height}, over the limit of {limits.max_side} pixels per side", 413, "max_side"
        )
    if min(width, height) < limits.min_side:
        raise ImageInputError(
            f"the image is {width}x{height}, under the minimum of {limits.min_side} pixels per side", 422, "min_side"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """The official `pil_img2rgb`: composite over white when there is an alpha channel (RGBA or a transparency
    entry), otherwise a plain conversion."""
    if image.mode == "RGBA" or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.split()[3])
        return white
    return image.convert("RGB")


def decode_image(data: bytes, limits: ImageLimits | None = None) -> Image.Image:
    """Validated bytes -> PIL RGB image (EXIF orientation applied); `ImageInputError` names any problem."""
    limits = limits or ImageLimits()
    if len(data) > limits.max_bytes:
        raise ImageInputError(
            f"the image is {len(data)} bytes, over the limit of {limits.max_bytes} bytes", 413, "max_bytes"
        )
    fmt = sniff_format(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])  # reads the header only
            check_size(*image.size, limits)
            image.load()
            oriented = ImageOps.exif_transpose(image)
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageInputError(f"the image is too large to decode ({e})", 413, "max_pixels") from e
    except Exception as e:  # untrusted bytes: whatever the decoder trips on (struct.error, ...) is a bad image
        raise ImageInputError(f"the {fmt} image is truncated or corrupt ({type(e).__name__}: {e})") from e
    check_size(*oriented.size, limits)
    return to_rgb(oriented)


def decode_base64(text: str, limits: ImageLimits | None = None) -> bytes:
    """A base64 string or a `data:image/...;base64,` URL -> bytes (size checked before decoding)."""
    limits = limits or ImageLimits()
    if not isinstance(text, str):
        raise ImageInputError("the image must be a base64 string")
    s = text.strip()
    if s.lower().startswith(("http://", "https://", "ftp://", "file:")):
        raise ImageInputError("image URLs are never fetched; send a data URL or base64 bytes")
    if s.startswith("data:"):
        header, sep, payload = s.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ImageInputError("a data URL must be data:image/<png|jpeg|webp>;base64,<bytes>")
        s = payload
    if len(s) * 3 // 4 > limits.max_bytes + 3:
        raise ImageInputError(
            f"the image is about {len(s) * 3 // 4} bytes, over the limit of {limits.max_bytes} bytes", 413, "max_bytes"
        )
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageInputError(f"the image is not valid base64 ({e})") from e
