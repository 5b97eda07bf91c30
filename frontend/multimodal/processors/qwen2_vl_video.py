"""Qwen2-VL video processing: equal to transformers' `Qwen2VLVideoProcessor` (its torchvision backend, on CPU).

transformers has no PIL video processor: videos always go through torch. So this follows the tensor path step by
step, in its order:

```
 frames uint8 [T, H, W, 3]
   -> smart_resize(H, W) with the video's min/max pixels (optionally capped by a whole-video token budget)
   -> resize: torch's uint8 antialiased bicubic (tensor_resize.py, equal to the bit; not Pillow's filter)
   -> rescale + normalize, fused as transformers fuses them: (x - mean * 255) / (std * 255) in float32
   -> pad T to a multiple of temporal_patch_size by repeating the last frame
   -> patches [grid_t * grid_h * grid_w, 3 * temporal_patch_size * patch_size**2]
 row order (grid_t, block row, block col, row in block, col in block); each row [C][T][P][P] flattened
```

The fused normalize maps each uint8 value of each channel to one float32, so it is a `[3, 256]` table here too.
Defaults are transformers' (`size` 128*28*28 .. 28*28*768 pixels per frame); a checkpoint's
`preprocessor_config.json` (or `video_preprocessor_config.json` when it has one) overrides them, top-level
`min_pixels`/`max_pixels` winning over `size` as for images.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np
from PIL import Image

from frontend.multimodal.processors.pixels import (
    DEFAULT_RESCALE_FACTOR,
    NUM_CHANNELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ByteArray,
    FloatArray,
    apply_pixel_table,
    config_flag,
    config_int,
    parse_channel_values,
    parse_resample,
)
from frontend.multimodal.processors.qwen2_vl import overridden_bounds, pixel_bounds, smart_resize
from frontend.multimodal.processors.tensor_resize import resize_frames

VIDEO_MIN_PIXELS: Final = 128 * 28 * 28
VIDEO_MAX_PIXELS: Final = 28 * 28 * 768
DEFAULT_MAX_VIDEO_TOKENS: Final = 128000
# resample values (Pillow's numbering, as configs write them) this module resizes exactly as torch does
RESIZE_MODES: Final = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}


@dataclass(frozen=True)
class Qwen2VLVideoInputs:
    """One video ready for the vision tower, and how many placeholder tokens stand for it in the prompt."""

    pixel_values_videos: FloatArray  # [grid_t * grid_h * grid_w, 3 * temporal_patch_size * patch_size**2]
    video_grid_thw: tuple[int, int, int]  # (grid_t, grid_h, grid_w) in patches
    num_tokens: int  # grid_t * grid_h * grid_w // merge_size**2


@dataclass(frozen=True)
class Qwen2VLVideoProcessor:
    """One model's Qwen2-VL video preprocessing; build it with `from_config`, narrow it per request with
    `with_overrides`. `min_pixels`/`max_pixels` bound each frame (transformers' size.shortest_edge/longest_edge)."""

    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
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
    # qwen-vl-utils' whole-video budget: each frame's max_pixels shrinks to an even share of max_video_tokens
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = DEFAULT_MAX_VIDEO_TOKENS
    _table: FloatArray = field(init=False, repr=False, compare=False)  # [3, 256]

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}")
        if self.resample not in RESIZE_MODES:
            raise ValueError(f"video resample must be bicubic (3) or bilinear (2), got {self.resample!r}")
        table = torch_pixel_table(self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean,
                                  self.image_std)
        object.__setattr__(self, "_table", table)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Qwen2VLVideoProcessor:
        """From a `preprocessor_config.json` / `video_preprocessor_config.json` dict; absent keys take
        transformers' `Qwen2VLVideoProcessor` defaults. Frame sampling inside the processor
        (`do_sample_frames`) is refused: frames are sampled when the video is decoded (`VideoSampling`)."""
        if config_flag(config, "do_sample_frames", False):
            raise ValueError("do_sample_frames is not supported; frames are sampled at decode time "
                             '(media_io_kwargs={"video": {"num_frames": N}})')
        min_pixels, max_pixels = pixel_bounds(config, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
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
            cap_pixels_per_frame=config_flag(config, "cap_pixels_per_frame", False),
            max_video_tokens=config_int(config, "max_video_tokens", DEFAULT_MAX_VIDEO_TOKENS),
        )

    def with_overrides(self, mm_processor_kwargs: Mapping[str, Any] | None) -> Qwen2VLVideoProcessor:
        """This processor with a request's `mm_processor_kwargs` (`min_pixels`, `max_pixels`, `size`) applied,
        under the image processor's rules: unknown keys raise ValueError, and neither bound may exceed this
        processor's `max_pixels` (a request may ask for fewer pixels per frame, never more)."""
        if not mm_processor_kwargs:
            return self
        min_pixels, max_pixels = overridden_bounds(mm_processor_kwargs, self.min_pixels, self.max_pixels)
        return replace(self, min_pixels=min_pixels, max_pixels=max_pixels)

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged token covers factor x factor pixels of a frame."""
        return self.patch_size * self.merge_size

    def frame_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """(height, width) every frame of a `num_frames`-frame video is resized to (unchanged without do_resize)."""
        if not self.do_resize:
            if height % self.factor or width % self.factor:
                raise ValueError(f"with do_resize off, frame sides must be multiples of {self.factor}, "
                                 f"got {height}x{width}")
            return height, width
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:  # transformers' arithmetic, float budget included
            total_pixels = int(self.max_video_tokens * self.factor * self.factor * 0.9)
            max_pixels = max(min(max_pixels, total_pixels * self.temporal_patch_size // num_frames),
                             int(self.min_pixels * 1.05))
        return smart_resize(height, width, self.factor, self.min_pixels, max_pixels)

    def num_video_tokens(self, num_frames: int, height: int, width: int) -> int:
        """Placeholder tokens for a video of `num_frames` frames of this size, without processing it."""
        resized_height, resized_width = self.frame_size(num_frames, height, width)
        grid_t = -(-num_frames // self.temporal_patch_size)
        grid_hw = (resized_height // self.patch_size) * (resized_width // self.patch_size)
        return grid_t * grid_hw // (self.merge_size * self.merge_size)

    def preprocess_video(self, frames: ByteArray) -> Qwen2VLVideoInputs:
        """RGB uint8 frames `[T, H, W, 3]` (decode_video's output) -> patches, grid and placeholder count."""
        if frames.ndim != 4 or frames.shape[-1] != NUM_CHANNELS or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
        num_frames, height, width, _ = frames.shape
        if num_frames == 0 or height == 0 or width == 0:
            raise ValueError(f"video has no pixels: {frames.shape}")
        resized_height, resized_width = self.frame_size(num_frames, height, width)
        if (resized_height, resized_width) != (height, width):
            frames = resize_frames(frames, resized_height, resized_width, RESIZE_MODES[self.resample])
        pixel_values, video_grid_thw = self._patchify(frames)
        num_tokens = video_grid_thw[0] * video_grid_thw[1] * video_grid_thw[2] // (self.merge_size ** 2)
        return Qwen2VLVideoInputs(pixel_values, video_grid_thw, num_tokens)

    def _patchify(self, frames: ByteArray) -> tuple[FloatArray, tuple[int, int, int]]:
        """uint8 `[T, H, W, 3]` -> float32 `[grid_t * grid_h * grid_w, 3 * T_p * P * P]` in transformers' order."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        if pad := -frames.shape[0] % t:  # repeat the last frame, as transformers does (after its normalize:
            frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])  # same values either way)
        num_frames, height, width, _ = frames.shape
        grid_t, grid_h, grid_w = num_frames // t, height // p, width // p
        blocks = frames.reshape(grid_t, t, grid_h // m, m, p, grid_w // m, m, p, NUM_CHANNELS)
        # [grid_t, block_row, block_col, row_in_block, col_in_block, C, T_p, P, P]: uint8, so the copy is cheap
        patches = blocks.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7).reshape(-1, NUM_CHANNELS, t, p, p)
        out = np.empty(patches.shape, dtype=np.float32)  # [N, C, T_p, P, P]
        apply_pixel_table(self._table, patches.transpose(1, 0, 2, 3, 4), out.transpose(1, 0, 2, 3, 4))
        return out.reshape(len(out), -1), (grid_t, grid_h, grid_w)


def torch_pixel_table(do_rescale: bool, rescale_factor: float, do_normalize: bool,
                      mean: tuple[float, float, float], std: tuple[float, float, float]) -> FloatArray:
    """What transformers' torchvision backend makes of each uint8 value, per channel: `[3, 256]` float32.

    With both steps on it fuses them (`_fuse_mean_std_and_rescale_factor`): mean and std become float32 tensors
    times 1 / rescale_factor, then `normalize` computes (x - mean) / std in float32. Without normalize it multiplies
    by rescale_factor in float32. numpy's float32 operations round as torch's do, so the table is bit-exact.
    """
    values = np.broadcast_to(np.arange(256, dtype=np.float32), (NUM_CHANNELS, 256))  # [3, 256]
    mean_f32 = np.asarray(mean, dtype=np.float32)[:, None]  # [3, 1]
    std_f32 = np.asarray(std, dtype=np.float32)[:, None]  # [3, 1]
    if do_normalize:
        if do_rescale:
            inverse = np.float32(1.0 / rescale_factor)
            mean_f32, std_f32 = mean_f32 * inverse, std_f32 * inverse
        table = (values - mean_f32) / std_f32
    elif do_rescale:
        table = values * np.float32(rescale_factor)
    else:
        table = values
    return np.ascontiguousarray(table, dtype=np.float32)
