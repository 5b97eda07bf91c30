"""GGUF quantized blocks decoded into `QuantizedTensor`s (integers + per-group scale and min), not into floats.

Each type Conveyor runs quantized is one of the kernel's two forms with one rounding per weight,
`fma(scale, value, min)`, matching how gguf-py (and so transformers) dequantizes it:
- Q8_0: int8 values, scale d per 32.                       d * q
- Q4_0: values 0..15, scale d, min -8d per 32.             d * (q - 8) (d*q and 8d are exact: one rounding)
- Q4_1: values 0..15, scale d, min m per 32.               d * q + m
- Q4_K: values 0..15 per 32-value sub-block, scale d*sc, min -dmin*m (6-bit sc and m, unpacked here).
- Q5_K: as Q4_K with 5-bit values (kept as 8-bit).
- Q6_K: values q - 32 (8-bit), scale d*sc per 16.
Other types (Q5_0, Q5_1, Q2_K, Q3_K, IQ*, ...) have no kernel form: the reader dequantizes them and says so.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from workers.layers.quantized import QuantizedTensor

QK_K = 256  # values per K-quant super-block


def kept_type_names() -> tuple[str, ...]:
    return tuple(_DECODERS)


def decode(raw: np.ndarray, type_name: str, rows: int, columns: int) -> QuantizedTensor:
    """raw: the tensor's bytes (rows of `columns` values each) -> values [rows, columns] and per-group scales/mins."""
    blocks = np.ascontiguousarray(raw).reshape(rows, -1).view(np.uint8)
    values, scales, mins, bits, group = _DECODERS[type_name](blocks.reshape(-1, blocks.shape[1]), rows)
    return QuantizedTensor(torch.from_numpy(np.ascontiguousarray(values.reshape(rows, columns))),
                           torch.from_numpy(np.ascontiguousarray(scales.reshape(rows, -1), dtype=np.float32)),
                           None if mins is None else torch.from_numpy(
                               np.ascontiguousarray(mins.reshape(rows, -1), dtype=np.float32)),
                           bits=bits, group_size=group, source=type_name)


_Decoded = tuple[np.ndarray, np.ndarray, Any, int, int]  # values, scales, mins | None, bits, group size


def _split_blocks(rows_bytes: np.ndarray, rows: int, block_bytes: int) -> np.ndarray:
    return rows_bytes.reshape(rows * (rows_bytes.shape[1] // block_bytes), block_bytes)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """[n, bytes] -> values: each `run` bytes give `run` low nibbles, then the same bytes' `run` high nibbles."""
    grouped = qs.reshape(qs.shape[0], -1, 1, run) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (grouped & np.uint8(0x0F)).reshape(qs.shape[0], -1)


def _q8_0(rows_bytes: np.ndarray, rows: int) -> _Decoded:
    blocks = _split_blocks(rows_bytes, rows, 34)
    return blocks[:, 2:].view(np.int8), _f16(blocks[:, :2]), None, 8, 32


def _q4_0(rows_bytes: np.ndarray, rows: int) -> _Decoded:
    blocks = _split_blocks(rows_bytes, rows, 18)
    d = _f16(blocks[:, :2])
    return _nibbles(blocks[:, 2:], 16), d, -8 * d, 4, 32


def _q4_1(rows_bytes: np.ndarray, rows: int) -> _Decoded:
    blocks = _split_blocks(rows_bytes, rows, 20)
    return _nibbles(blocks[:, 4:], 16), _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), 4, 32


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: per sub-block scale d*sc and min -(dmin*m), [n, 8] each (6-bit sc/m packed in 12 bytes)."""
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    packed = blocks[:, 4:16].reshape(-1, 3, 4)
    low, high, mixed = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = np.concatenate([low & 0x3F, (mixed & 0x0F) | ((low >> 2) & 0x30)], axis=1).astype(np.float32)
    m = np.concatenate([high & 0x3F, (mixed >> 4) | ((high >> 2) & 0x30)], axis=1).astype(np.float32)
    return d * sc, -(dmin * m)


def _q4_k(rows_bytes: np.ndarray, rows: int) -> _Decoded:
    blocks = _split_blocks(rows_bytes, rows, 144)
    scales, mins = _k_scales(blocks)
    return _nibbles(blocks[:, 16:], 32), scales, mins, 4, 32


def _q5_k(rows_bytes: np.ndarray, rows: int) -> _Decoded:
    blocks = _split_blocks(rows_bytes, rows, 176)
    scales, mins = _k_scales(blocks)
    low = _nibbles(blocks[:, 48:], 32).reshape(-1, 8, 32)
    qh = blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)  # bit j: sub-block j
    values = (low | ((qh & np.uint8(1)) << np.uint8(4))).astype(np.int8)
    return values.reshape(blocks.shape[0], -1), scales, mins, 8, 32


def _q6_k(rows_bytes: np.ndarray, rows: int) -> _Decoded:
    blocks = _split_blocks(rows_bytes, rows, 210)
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32) * _f16(blocks[:, 208:210])
    low = _nibbles(ql, 64).reshape(-1, 8, 32)
    high = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    values = (low | (high.reshape(-1, 8, 32) << np.uint8(4))).astype(np.int8) - np.int8(32)
    return values.reshape(blocks.shape[0], -1), scales, None, 8, 16


_DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
