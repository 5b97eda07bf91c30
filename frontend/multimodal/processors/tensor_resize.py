"""torch's uint8 antialiased resize (what torchvision's tensor `resize` runs on CPU) in numpy, to the bit.

transformers' torchvision-backend processors (every video processor) resize uint8 tensors with
`torchvision.transforms.v2.functional.resize(..., antialias=True)`. For bicubic on any CPU, and bilinear on
AVX2/AVX512 CPUs, torchvision hands the uint8 tensor straight to `torch.nn.functional.interpolate`, whose kernel
(aten/src/ATen/native/cpu/UpSampleKernel.cpp, a port of Pillow-SIMD) works in integers:

- per axis, Pillow-style float64 filter weights (bicubic a = -0.5, support 2 * max(1, scale)), normalized per
  output pixel, then scaled to int16 with the largest precision that keeps the biggest weight under 2**15;
- a horizontal pass into a uint8 intermediate, then a vertical pass, each `(sum(w * x) + 2**(p-1)) >> p`
  clamped to [0, 255].

Pillow's own resize uses 22-bit int32 weights, so it differs from this by one level in ~0.5% of pixels; that is
why the video path cannot reuse `pixels.resize`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

import numpy as np

from frontend.multimodal.processors.pixels import ByteArray

IntArray = np.ndarray[Any, np.dtype[np.int32]]

MAX_WEIGHT_PRECISION: Final = 22  # torch stops its precision search here
INT16_LIMIT: Final = 1 << 15


def _bicubic(x: float) -> float:
    """HelperInterpCubic::aa_filter with Keys' a = -0.5 (torch's choice when antialias is on)."""
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2.0:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def _bilinear(x: float) -> float:
    """HelperInterpLinear::aa_filter (a triangle)."""
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


FILTERS: Final = {"bicubic": (_bicubic, 4), "bilinear": (_bilinear, 2)}  # mode -> (filter, interp_size)


@dataclass(frozen=True)
class AxisWeights:
    """One axis's resampling plan: output pixel i reads input `taps[i]` with int16-valued `weights[i]`."""

    taps: IntArray  # [out_size, max_taps] input indices (clamped in range; weights past a pixel's span are 0)
    weights: IntArray  # [out_size, max_taps] int16 values held as int32
    precision: int  # weights are fixed point with this many fractional bits


@lru_cache(maxsize=256)
def axis_weights(in_size: int, out_size: int, mode: str) -> AxisWeights:
    """torch's `_compute_index_ranges_int16_weights` for antialias=True, align_corners=False, no scale factor."""
    filter_fn, interp_size = FILTERS[mode]
    scale = in_size / out_size
    support = interp_size * 0.5 * scale if scale >= 1.0 else interp_size * 0.5
    max_taps = math.ceil(support) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    float_weights = np.zeros((out_size, max_taps), dtype=np.float64)  # [out_size, max_taps]
    starts = np.zeros(out_size, dtype=np.int64)
    max_weight = 0.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        start = max(int(center - support + 0.5), 0)  # C++ truncation toward zero, as torch's static_cast
        size = min(max(min(int(center + support + 0.5), in_size) - start, 0), max_taps)
        row = [filter_fn((j + start - center + 0.5) * invscale) for j in range(size)]
        total = 0.0
        for w in row:  # sequential sum, in torch's order
            total += w
        if total != 0.0:
            row = [w / total for w in row]
            max_weight = max(max_weight, *row)
        starts[i] = start
        float_weights[i, :size] = row
    precision = _weight_precision(max_weight)
    scaled = float_weights * (1 << precision)
    # (int)(v + 0.5) / (int)(v - 0.5): round half away from zero by truncation, as torch writes it
    weights = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    taps = np.minimum(starts[:, None] + np.arange(max_taps), in_size - 1).astype(np.int32)
    return AxisWeights(taps, weights, precision)


def _weight_precision(max_weight: float) -> int:
    """The largest precision (< 22) at which the biggest weight, scaled and rounded, still fits in int16."""
    precision = 0
    while precision < MAX_WEIGHT_PRECISION:
        if int(0.5 + max_weight * (1 << (precision + 1))) >= INT16_LIMIT:
            break
        precision += 1
    return precision


def _resample_axis0(pixels: ByteArray, plan: AxisWeights) -> ByteArray:
    """Resample axis 0 of a uint8 array (any trailing shape) with one axis plan; uint8 out, torch's rounding."""
    out_size, max_taps = plan.weights.shape
    acc = np.full((out_size, *pixels.shape[1:]), 1 << (plan.precision - 1), dtype=np.int32)  # [out, ...]
    expand = (slice(None),) + (None,) * (pixels.ndim - 1)
    scratch = np.empty_like(acc)
    for tap in range(max_taps):
        rows = pixels[plan.taps[:, tap]]  # [out, ...] uint8: whole rows, so the gather is a block copy
        np.multiply(rows, plan.weights[:, tap][expand], out=scratch)
        acc += scratch
    np.right_shift(acc, plan.precision, out=acc)  # arithmetic shift: floors negatives as C's >> does
    return np.clip(acc, 0, 255).astype(np.uint8)


def resize_frames(frames: ByteArray, height: int, width: int, mode: str = "bicubic") -> ByteArray:
    """Resize uint8 frames `[T, H, W, C]` to `[T, height, width, C]` exactly as torch resizes a uint8 `[T, C, H, W]`
    tensor with `interpolate(mode, antialias=True, align_corners=False)`: horizontal pass first, then vertical.

    `mode` is "bicubic" or "bilinear". Frames go one at a time so the int32 accumulators stay one frame big.
    """
    if mode not in FILTERS:
        raise ValueError(f"resize mode must be one of {sorted(FILTERS)}, got {mode!r}")
    num_frames, in_height, in_width, num_channels = frames.shape
    out = np.empty((num_frames, height, width, num_channels), dtype=np.uint8)  # [T, height, width, C]
    for index in range(num_frames):
        out[index] = _resize_frame(frames[index], height, width, mode)
    return out


def _resize_frame(frame: ByteArray, height: int, width: int, mode: str) -> ByteArray:
    """One `[H, W, C]` frame; each pass puts its resized axis first so a tap's gather copies whole rows."""
    in_height, in_width, _ = frame.shape
    if width != in_width:
        by_column = np.ascontiguousarray(frame.transpose(1, 0, 2))  # [W, H, C]
        frame = _resample_axis0(by_column, axis_weights(in_width, width, mode)).transpose(1, 0, 2)  # [H, width, C]
    if height != in_height:
        frame = _resample_axis0(np.ascontiguousarray(frame), axis_weights(in_height, height, mode))  # [height, ., C]
    return frame
