"""Pieces every image processor shares: config parsing, Pillow resizing and the rescale+normalize lookup table.

transformers' PIL backend resizes a uint8 image with Pillow, then rescales in float64, casts to float32 and
normalizes in float32. Those last two steps map each uint8 value of each channel to one float, so they are a
table of 3 x 256 floats computed the same way: applying it is one gather per channel, bit for bit equal to
transformers and with no float64 copy of the image.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

FloatArray = np.ndarray[Any, np.dtype[np.float32]]
ByteArray = np.ndarray[Any, np.dtype[np.uint8]]

NUM_CHANNELS = 3  # decode_image always hands over RGB
DEFAULT_RESCALE_FACTOR = 1 / 255
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def parse_resample(value: object, default: Image.Resampling) -> Image.Resampling:
    """The Pillow filter a config's `resample` names (an int such as 3 = BICUBIC); `default` when absent."""
    if value is None:
        return default
    # Every config error is a ValueError (not TypeError) so a caller has one type to turn into a 400 (TRY004).
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"resample must be a Pillow filter number, got {value!r}")  # noqa: TRY004
    try:
        return Image.Resampling(value)
    except ValueError as exc:
        raise ValueError(f"resample {value} is not a Pillow filter") from exc


def parse_channel_values(value: object, default: Sequence[float], name: str) -> tuple[float, float, float]:
    """A per-channel mean or std: one float for all channels (as transformers allows) or one per channel."""
    if value is None:
        value = default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        same = float(value)
        return same, same, same
    if not isinstance(value, Sequence) or len(value) != NUM_CHANNELS:
        raise ValueError(f"{name} must be a number or {NUM_CHANNELS} numbers, got {value!r}")
    first, second, third = (float(v) for v in value)
    return first, second, third


def config_flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
    """`config[key]` as a bool; absent or null means `default` (configs write null for "unset")."""
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")  # noqa: TRY004 (see parse_resample)
    return value


def config_int(config: Mapping[str, Any], key: str, default: int) -> int:
    """`config[key]` as a positive int; absent or null means `default`."""
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def build_pixel_table(do_rescale: bool, rescale_factor: float, do_normalize: bool,
                      mean: Sequence[float], std: Sequence[float]) -> FloatArray:
    """What transformers' `rescale` then `normalize` make of each uint8 value, per channel: `[3, 256]` float32.

    The arithmetic copies theirs step by step (float64 multiply, cast to float32, float32 subtract and divide),
    so a gather through this table equals their output exactly.
    """
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (NUM_CHANNELS, 256))  # [3, 256]
    table = values.astype(np.float32)
    if do_rescale:
        table = (values.astype(np.float64) * rescale_factor).astype(np.float32)
    if do_normalize:
        mean_f32 = np.asarray(mean, dtype=np.float32)[:, None]  # [3, 1]
        std_f32 = np.asarray(std, dtype=np.float32)[:, None]  # [3, 1]
        table = (table - mean_f32) / std_f32
    return np.ascontiguousarray(table, dtype=np.float32)


def apply_pixel_table(table: FloatArray, channels: ByteArray, out: FloatArray) -> None:
    """`out[c] = table[c][channels[c]]` for each channel; both have the channel on axis 0 (views are fine).

    Writing into `out` lets a caller fill a strided slot of a bigger array with no float temporary.
    """
    for channel in range(NUM_CHANNELS):
        # mode="clip" is never exercised (uint8 indices are < 256) but lets numpy skip buffering the output
        np.take(table[channel], channels[channel], out=out[channel], mode="clip")


def resize(image: Image.Image, height: int, width: int, resample: Image.Resampling) -> Image.Image:
    """Pillow's resize with the arguments transformers' PIL backend passes (reducing_gap=None)."""
    return image.resize((width, height), resample=resample)


def rgb_array(image: Image.Image) -> ByteArray:
    """The image's pixels `[H, W, 3]` uint8; callers hand over RGB images (decode_image's output)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image (decode_image's output), got mode {image.mode}")
    return np.asarray(image, dtype=np.uint8)  # [H, W, 3]
