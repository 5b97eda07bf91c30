"""Pooled values on the wire to the client: a JSON list of floats, or base64 of packed binary values.

base64 packs the values row-major as `embed_dtype` (float32, float16, or bfloat16 = the top 16 bits of the
float32, rounded to nearest even) in the byte order `endianness` names ("native" is this host's, which is what
the `openai` client's `np.frombuffer(..., dtype="float32")` assumes).
"""
from __future__ import annotations

import base64
import sys
from typing import Any, Literal

import numpy as np

from engine_core.protocol import PoolingOutput

EncodingFormat = Literal["float", "base64"]
EmbedDType = Literal["float32", "float16", "bfloat16"]
Endianness = Literal["native", "big", "little"]

_BYTE_ORDER = {"little": "<", "big": ">", "native": "<" if sys.byteorder == "little" else ">"}


def pooled_array(output: PoolingOutput) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The engine's little-endian float32 bytes as an array of `output.shape`."""
    return np.frombuffer(output.data, dtype="<f4").astype(np.float32).reshape(output.shape)


def bfloat16_bits(values: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.uint16]]:
    """The bfloat16 bit patterns of float32 `values`, rounded to nearest even (as torch's conversion does)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    quiet_nan = ((bits >> 16) | np.uint32(0x0040)).astype(np.uint16)  # keep NaN a NaN (rounding could make it inf)
    return np.where(np.isnan(values), quiet_nan, rounded)


def pack_values(values: np.ndarray[Any, Any], embed_dtype: EmbedDType, endianness: Endianness) -> bytes:
    """The values (any shape, flattened row-major) as packed `embed_dtype` bytes in `endianness` order."""
    order = _BYTE_ORDER[endianness]
    if embed_dtype == "bfloat16":
        return bfloat16_bits(values).astype(f"{order}u2").tobytes()
    item = "f4" if embed_dtype == "float32" else "f2"
    return np.ascontiguousarray(values, dtype=np.float32).astype(f"{order}{item}").tobytes()


def encode_values(values: np.ndarray[Any, Any], encoding_format: EncodingFormat, embed_dtype: EmbedDType = "float32",
                  endianness: Endianness = "native") -> list[Any] | str:
    """A nested float list (the array's shape), or one base64 string of the packed values."""
    if encoding_format == "base64":
        return base64.b64encode(pack_values(values, embed_dtype, endianness)).decode("ascii")
    result: list[Any] = values.tolist()
    return result
