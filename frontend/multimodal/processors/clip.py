"""CLIP-style image processing for LLaVA: equal to transformers' `CLIPImageProcessorPil` / `LlavaImageProcessorPil`.

Steps, in their order: [pad to square] -> resize (shortest edge, Pillow) -> center crop -> rescale + normalize
-> `[3, H, W]` float32. Pillow does the resize with transformers' filter and output-size arithmetic; numpy does
the rest.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from frontend.multimodal.processors.pixels import (
    DEFAULT_RESCALE_FACTOR,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ByteArray,
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

CLIP_VISION_DEFAULTS = {"image_size": 224, "patch_size": 32}  # transformers' CLIPVisionConfig defaults


@dataclass(frozen=True)
class ClipImageProcessor:
    """One model's CLIP preprocessing; build it with `from_config(preprocessor_config.json as a dict)`.

    Resize targets: `shortest_edge` (aspect ratio kept) or, when it is None, exactly `height` x `width`.
    `do_pad` is LLaVA's pad-to-square before resizing, filled with the mean colour.
    """

    do_resize: bool = True
    shortest_edge: int | None = 224
    height: int | None = None
    width: int | None = None
    resample: Image.Resampling = Image.Resampling.BICUBIC
    do_center_crop: bool = True
    crop_height: int = 224
    crop_width: int = 224
    do_rescale: bool = True
    rescale_factor: float = DEFAULT_RESCALE_FACTOR
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_pad: bool = False
    _table: FloatArray = field(init=False, repr=False, compare=False)  # [3, 256]

    def __post_init__(self) -> None:
        if self.do_resize and self.shortest_edge is None and (self.height is None or self.width is None):
            raise ValueError("resizing needs size.shortest_edge or size.height and size.width")
        table = build_pixel_table(self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean,
                                  self.image_std)
        object.__setattr__(self, "_table", table)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClipImageProcessor:
        """From a `preprocessor_config.json` dict; absent keys take `CLIPImageProcessor`'s defaults.

        `do_convert_rgb` is accepted and ignored: `decode_image` always hands over RGB.
        """
        shortest_edge, height, width = _parse_size(config.get("size", {"shortest_edge": 224}))
        crop_height, crop_width = _parse_crop_size(config.get("crop_size", {"height": 224, "width": 224}))
        return cls(
            do_resize=config_flag(config, "do_resize", True),
            shortest_edge=shortest_edge, height=height, width=width,
            resample=parse_resample(config.get("resample"), Image.Resampling.BICUBIC),
            do_center_crop=config_flag(config, "do_center_crop", True),
            crop_height=crop_height, crop_width=crop_width,
            do_rescale=config_flag(config, "do_rescale", True),
            rescale_factor=float(config.get("rescale_factor", DEFAULT_RESCALE_FACTOR)),
            do_normalize=config_flag(config, "do_normalize", True),
            image_mean=parse_channel_values(config.get("image_mean"), OPENAI_CLIP_MEAN, "image_mean"),
            image_std=parse_channel_values(config.get("image_std"), OPENAI_CLIP_STD, "image_std"),
            do_pad=bool(config.get("do_pad") or False),  # null in some configs
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing, as transformers' `get_resize_output_image_size` computes it."""
        if self.shortest_edge is None:
            assert self.height is not None and self.width is not None  # checked in __post_init__
            return self.height, self.width
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def preprocess(self, image: Image.Image) -> FloatArray:
        """An RGB image (decode_image's output) -> `pixel_values` `[3, H, W]` float32."""
        if self.do_pad:
            image = self._pad_to_square(image)
        if self.do_resize:
            image = resize(image, *self.output_size(image.height, image.width), self.resample)
        pixels = rgb_array(image)  # [H, W, 3]
        if self.do_center_crop:
            pixels = center_crop(pixels, self.crop_height, self.crop_width)  # [crop_h, crop_w, 3]
        pixel_values = np.empty((3, *pixels.shape[:2]), dtype=np.float32)  # [3, H, W]
        apply_pixel_table(self._table, pixels.transpose(2, 0, 1), pixel_values)
        return pixel_values

    def _pad_to_square(self, image: Image.Image) -> Image.Image:
        """LLaVA's pad-to-square: centred on a square of the longer side, filled with int(mean * 255)."""
        if image.width == image.height:
            return image
        side = max(image.width, image.height)
        fill = tuple(int(x * 255) for x in self.image_mean)
        square = Image.new("RGB", (side, side), fill)
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        return square


def center_crop(pixels: ByteArray, crop_height: int, crop_width: int) -> ByteArray:
    """transformers' `center_crop` on `[H, W, C]`: zero-pads first where the image is smaller than the crop."""
    height, width = pixels.shape[:2]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + crop_height, left:left + crop_width]
    new_height, new_width = max(crop_height, height), max(crop_width, width)
    canvas = np.zeros((new_height, new_width, pixels.shape[2]), dtype=pixels.dtype)  # [new_h, new_w, C]
    top_pad, left_pad = math.ceil((new_height - height) / 2), math.ceil((new_width - width) / 2)
    canvas[top_pad:top_pad + height, left_pad:left_pad + width] = pixels
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top):min(new_height, top + crop_height), max(0, left):min(new_width, left + crop_width)]


def llava_num_image_tokens(llava_config: Mapping[str, Any]) -> int:
    """How many tokens LLaVA expands one `<image>` to, from the model's config.json (a `LlavaConfig` dict).

    A CLIP tower emits (image_size // patch_size)**2 patch features plus a CLS feature; strategy "default" drops
    the first feature (CLS), "full" keeps all. SigLIP towers have no CLS, but "default" still drops the first.
    """
    vision = {**CLIP_VISION_DEFAULTS, **(llava_config.get("vision_config") or {})}
    grid = config_int(vision, "image_size", 224) // config_int(vision, "patch_size", 32)
    has_cls = vision.get("model_type", "clip_vision_model") != "siglip_vision_model"
    strategy = llava_config.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
    return grid * grid + int(has_cls) - int(strategy == "default")


def _parse_size(size: object) -> tuple[int | None, int | None, int | None]:
    """`size` -> (shortest_edge, height, width); an int means the shortest edge (CLIP's default_to_square=False)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size, None, None
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return None, int(size[0]), int(size[1])
    if isinstance(size, Mapping):
        if "shortest_edge" in size and "longest_edge" not in size:
            return config_int(size, "shortest_edge", 0), None, None
        if set(size) == {"height", "width"}:
            return None, config_int(size, "height", 0), config_int(size, "width", 0)
    raise ValueError(f"unsupported size {size!r}: expected shortest_edge, or height and width")


def _parse_crop_size(crop_size: object) -> tuple[int, int]:
    if isinstance(crop_size, int) and not isinstance(crop_size, bool):
        return crop_size, crop_size
    if isinstance(crop_size, (list, tuple)) and len(crop_size) == 2:
        return int(crop_size[0]), int(crop_size[1])
    if isinstance(crop_size, Mapping) and set(crop_size) == {"height", "width"}:
        return config_int(crop_size, "height", 0), config_int(crop_size, "width", 0)
    raise ValueError(f"unsupported crop_size {crop_size!r}: expected height and width")
