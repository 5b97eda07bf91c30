"""Image bytes -> an RGB Pillow image, the input every processor here takes.

Transparency is composited onto white exactly as transformers' `convert_to_rgb` does (alpha_composite, for any
mode with an alpha band or a transparency key); for RGBA this is pixel-identical to vLLM's paste onto white.
EXIF orientation is not applied, as neither vLLM's image loader nor transformers' processors apply it.
"""
from __future__ import annotations

import io
import warnings
from functools import cache
from typing import Final

from PIL import Image

# Raster formats a client may send. Pillow would also try EPS (which runs Ghostscript), PDF-like and many rare
# formats with little-exercised parsers; an allow-list keeps untrusted bytes away from those. JPEG includes
# MPO (phone cameras' multi-picture JPEG): Pillow's JPEG opener returns those.
DECODABLE_FORMATS: Final = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "ICO", "PPM")


class ImageDecodeError(ValueError):
    """The bytes are not an image this server decodes, or the image is too large (a decompression bomb)."""


def decode_image(data: bytes) -> Image.Image:
    """Decode `data` (first frame of an animation) to an RGB image; raise `ImageDecodeError` if it cannot be.

    Images over `PIL.Image.MAX_IMAGE_PIXELS` (the operator's knob; Pillow's default is ~89 M pixels) are refused
    before their pixels are decoded. Safe to call from several threads.
    """
    try:
        image = _open_checked(data)
        image.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image refused as a possible decompression bomb: {exc}") from exc
    except Exception as exc:  # Pillow's parsers raise many types on malformed input (OSError, SyntaxError, ...)
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {exc}") from exc
    return to_rgb(image)


def _open_checked(data: bytes) -> Image.Image:
    """Read only the header, refusing sizes over MAX_IMAGE_PIXELS before any pixel is decoded."""
    # Pillow only warns between 1x and 2x its limit; the filter makes that an exception here. catch_warnings is
    # not thread-safe (it swaps a global list), so the explicit check below is what guarantees the refusal.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data), formats=_available_formats())
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise ImageDecodeError(f"image of {width}x{height} pixels is over the limit of {limit} pixels "
                               "(decompression bomb guard)")
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has an empty size {width}x{height}")
    return image


@cache
def _available_formats() -> tuple[str, ...]:
    """DECODABLE_FORMATS this Pillow build has (AVIF and WEBP are optional); naming an absent one to
    Image.open raises KeyError."""
    Image.init()
    return tuple(name for name in DECODABLE_FORMATS if name in Image.OPEN)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white, as transformers' `convert_to_rgb` does."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
