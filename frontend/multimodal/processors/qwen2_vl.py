"""Qwen2-VL image processing: equal to transformers' `Qwen2VLImageProcessorPil`.

smart_resize picks a size whose sides are multiples of patch_size * merge_size and whose area lies in
[min_pixels, max_pixels]; Pillow resizes; the lookup table rescales and normalizes; the image is cut into
patch_size x patch_size patches, each repeated temporal_patch_size times (a still image is a 1-step video), in
the order the vision tower's patch merger expects: each merge_size x merge_size block of patches is contiguous.

```
 pixel_values row = one patch: [3 channels][temporal_patch_size][patch_size][patch_size] flattened
 row order:        (block row, block col, row in block, col in block)   block = merge_size x merge_size patches
```
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from frontend.multimodal.processors.pixels import (
    DEFAULT_RESCALE_FACTOR,
    NUM_CHANNELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    FloatArray,
    apply_pixel_table,
    build_pixel_table,
    config_flag,
    config_int,
    parse_channel_values,
    parse_resample,
    resize,
    rgb_array,
)

MAX_ASPECT_RATIO = 200  # smart_resize refuses anything more elongated
OVERRIDABLE_KEYS = frozenset({"min_pixels", "max_pixels", "size"})


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' `smart_resize`, operation for operation (Python's round, floor and ceil, float sqrt)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
                         f"got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class Qwen2VLImageInputs:
    """One image ready for the vision tower, and how many placeholder tokens stand for it in the prompt."""

    pixel_values: FloatArray  # [grid_t * grid_h * grid_w, 3 * temporal_patch_size * patch_size**2]
    grid_thw: tuple[int, int, int]  # (grid_t, grid_h, grid_w) in patches; grid_t = 1 for an image
    num_tokens: int  # grid_t * grid_h * grid_w // merge_size**2


@dataclass(frozen=True)
class Qwen2VLImageProcessor:
    """One model's Qwen2-VL image preprocessing; build it with `from_config`, narrow it per request with
    `with_overrides`. `min_pixels`/`max_pixels` are transformers' size.shortest_edge/longest_edge."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    do_resize: bool = True
    resample: Image.Resampling = Image.Resampling.BICUBIC
    do_rescale: bool = True
    rescale_factor: float = DEFAULT_RESCALE_FACTOR
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    _table: FloatArray = field(init=False, repr=False, compare=False)  # [3, 256]

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}")
        table = build_pixel_table(self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean,
                                  self.image_std)
        object.__setattr__(self, "_table", table)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Qwen2VLImageProcessor:
        """From a `preprocessor_config.json` dict. As in transformers, top-level `min_pixels`/`max_pixels` win
        over `size` {"shortest_edge", "longest_edge"}; absent keys take `Qwen2VLImageProcessor`'s defaults."""
        min_pixels, max_pixels = pixel_bounds(config, cls.min_pixels, cls.max_pixels)
        return cls(
            min_pixels=min_pixels, max_pixels=max_pixels,
            patch_size=config_int(config, "patch_size", 14),
            temporal_patch_size=config_int(config, "temporal_patch_size", 2),
            merge_size=config_int(config, "merge_size", 2),
            do_resize=config_flag(config, "do_resize", True),
            resample=parse_resample(config.get("resample"), Image.Resampling.BICUBIC),
            do_rescale=config_flag(config, "do_rescale", True),
            rescale_factor=float(config.get("rescale_factor", DEFAULT_RESCALE_FACTOR)),
            do_normalize=config_flag(config, "do_normalize", True),
            image_mean=parse_channel_values(config.get("image_mean"), OPENAI_CLIP_MEAN, "image_mean"),
            image_std=parse_channel_values(config.get("image_std"), OPENAI_CLIP_STD, "image_std"),
        )

    def with_overrides(self, mm_processor_kwargs: Mapping[str, Any] | None) -> Qwen2VLImageProcessor:
        """This processor with a request's `mm_processor_kwargs` (`min_pixels`, `max_pixels`, `size`) applied.

        Unknown keys raise ValueError. Neither bound may exceed this processor's `max_pixels`: a request may ask
        for fewer pixels than the model's config allows, never more (an upscale to a client-chosen size is an
        easy way to exhaust memory).
        """
        if not mm_processor_kwargs:
            return self
        min_pixels, max_pixels = overridden_bounds(mm_processor_kwargs, self.min_pixels, self.max_pixels)
        return replace(self, min_pixels=min_pixels, max_pixels=max_pixels)

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the image is resized to (unchanged when do_resize is off)."""
        if not self.do_resize:
            if height % self.factor or width % self.factor:
                raise ValueError(f"with do_resize off, image sides must be multiples of {self.factor}, "
                                 f"got {height}x{width}")
            return height, width
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens for an image of this size, without processing it."""
        resized_height, resized_width = self.output_size(height, width)
        return resized_height * resized_width // (self.factor * self.factor)

    def preprocess(self, image: Image.Image) -> Qwen2VLImageInputs:
        """An RGB image (decode_image's output) -> patches, grid and placeholder count."""
        resized_height, resized_width = self.output_size(image.height, image.width)
        if self.do_resize:
            image = resize(image, resized_height, resized_width, self.resample)
        pixel_values, grid_h, grid_w = self._patchify(rgb_array(image))
        num_tokens = grid_h * grid_w // (self.merge_size * self.merge_size)
        return Qwen2VLImageInputs(pixel_values, (1, grid_h, grid_w), num_tokens)

    def _patchify(self, pixels: np.ndarray[Any, np.dtype[np.uint8]]) -> tuple[FloatArray, int, int]:
        """uint8 `[H, W, 3]` -> float32 `[grid_h * grid_w, 3 * T * P * P]` in transformers' patch order."""
        height, width, _ = pixels.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = height // p, width // p
        blocks = pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, NUM_CHANNELS)
        # [block_row, block_col, row_in_block, col_in_block, C, P, P]: still uint8, so this copy is cheap
        patches = blocks.transpose(0, 3, 1, 4, 6, 2, 5).reshape(grid_h * grid_w, NUM_CHANNELS, p, p)
        out = np.empty((grid_h * grid_w, NUM_CHANNELS, t, p, p), dtype=np.float32)  # [N, C, T, P, P]
        apply_pixel_table(self._table, patches.transpose(1, 0, 2, 3), out[:, :, 0].transpose(1, 0, 2, 3))
        out[:, :, 1:] = out[:, :, :1]  # a still image repeats itself over the temporal patch
        return out.reshape(grid_h * grid_w, NUM_CHANNELS * t * p * p), grid_h, grid_w


def overridden_bounds(mm_processor_kwargs: Mapping[str, Any], min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(min_pixels, max_pixels) after a request's overrides; ValueError for unknown keys or a bound above the
    model's `max_pixels` (a request may ask for fewer pixels, never more: an upscale to a client-chosen size is an
    easy way to exhaust memory)."""
    unknown = set(mm_processor_kwargs) - OVERRIDABLE_KEYS
    if unknown:
        raise ValueError(f"unsupported mm_processor_kwargs {sorted(unknown)}; "
                         f"this model accepts {sorted(OVERRIDABLE_KEYS)}")
    new_min, new_max = pixel_bounds(mm_processor_kwargs, min_pixels, max_pixels)
    if max(new_min, new_max) > max_pixels:
        raise ValueError(f"min_pixels and max_pixels may not exceed the model's max_pixels {max_pixels}")
    return new_min, new_max


def pixel_bounds(source: Mapping[str, Any], min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(min_pixels, max_pixels) from `source`'s `size` then its top-level keys (which win), else the given ones."""
    size = source.get("size")
    if size is not None:
        if not isinstance(size, Mapping):
            raise ValueError(f"size must be an object with shortest_edge and longest_edge, got {size!r}")
        aliases = {"shortest_edge": "min_pixels", "longest_edge": "max_pixels"}  # older configs spell them so
        unknown = set(size) - set(aliases) - set(aliases.values())
        if unknown:
            raise ValueError(f"unsupported size keys {sorted(unknown)}: expected shortest_edge and longest_edge")
        normalized: dict[str, Any] = {aliases.get(str(key), str(key)): value for key, value in size.items()}
        min_pixels = config_int(normalized, "min_pixels", min_pixels)
        max_pixels = config_int(normalized, "max_pixels", max_pixels)
    return config_int(source, "min_pixels", min_pixels), config_int(source, "max_pixels", max_pixels)
