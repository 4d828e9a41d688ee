"""Decode an image body with Pillow: any common format, EXIF orientation, every pixel mode."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from handlers.errors import InvalidInput, PayloadTooLarge, UndecodableInput

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_PIXELS = 40_000_000


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode `data`; the first frame of an animation; size checked before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
                )
            image.seek(0)
            image.load()
    except PayloadTooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"the image is too large to decode safely: {exc}") from None
    except UnidentifiedImageError:
        raise UndecodableInput(
            f"the payload is not an image in a supported format ({', '.join(FORMATS)})"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise UndecodableInput(f"the image is truncated or corrupt: {exc}") from None
    if width == 0 or height == 0:
        raise InvalidInput("the image has no pixels")
    return image


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Apply EXIF orientation and convert to `mode` ("RGB" or "L"), compositing alpha over white
    and scaling 16/32-bit grey to 8 bits instead of clipping it."""
    with contextlib.suppress(Exception):
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        grey = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(grey.max()), 1.0)
        image = Image.fromarray(np.clip(grey / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert(mode)
