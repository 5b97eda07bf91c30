"""Weights kept as small integers with a float scale (and min) per group of values along the input dimension.

`QuantizedTensor` is a weight in Hugging Face row order ([out_features, in_features], one integer per byte): what
the GGUF reader yields for the types Conveyor runs quantized (workers/loading/gguf_quants.py) and what
`quantize_weight` makes of a float weight (`--quantization int8|int4`). Layers narrow and concatenate it like a
tensor while loading their shard, then `pack` turns it into the kernel's layout (`QuantizedWeight`,
workers/kernels/quant_gemm.cpp). Every weight dequantizes as `fma(scale, value, min)`, one rounding, which is how
each GGUF type we keep dequantizes too: the packed weight's values are the dequantized checkpoint's bits.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from workers.kernels import cpu as cpu_kernels

QUANTIZATION_MODES = ("none", "gguf", "int8", "int4")  # --quantization; "auto" resolves to one of these
INT4_GROUP_SIZE = 32  # --quantization int4: one scale and min per 32 input values (GGUF Q4_1's choice)
_FORMAT_INT8, _FORMAT_UINT4 = 1, 2  # quant_gemm.cpp's WeightFormat
_BLOCK = cpu_kernels.BLOCK_COLUMNS  # output rows interleaved per k

logger = logging.getLogger("conveyor.quantization")
_dequantized_logged: set[str] = set()


def log_dequantized(source: str, reason: str) -> None:
    """Once per source type: its weights run dequantized (float) after all, and why."""
    if source not in _dequantized_logged:
        _dequantized_logged.add(source)
        logger.info("%s weights dequantized at load: %s", source, reason)


@dataclass(frozen=True)
class QuantizedTensor:
    """values [N, K] (uint8 0..15 for 4 bits, int8 for 8 bits), scales/mins [N, K // group_size] float32."""

    values: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None  # None: every min is 0
    bits: int  # 4 or 8
    group_size: int
    source: str  # what it came from, for log lines: "Q4_1", "int8", ...

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def narrow(self, dim: int, start: int, length: int) -> QuantizedTensor | torch.Tensor:
        """Rows, or input columns on group boundaries; columns across a group come back dequantized (float32)."""
        if dim == 0:
            return replace(self, values=self.values.narrow(0, start, length), scales=self.scales.narrow(0, start, length),
                           mins=None if self.mins is None else self.mins.narrow(0, start, length))
        if start % self.group_size or length % self.group_size:
            return self.dequantize().narrow(dim, start, length)
        first, count = start // self.group_size, length // self.group_size
        return replace(self, values=self.values.narrow(1, start, length), scales=self.scales.narrow(1, first, count),
                       mins=None if self.mins is None else self.mins.narrow(1, first, count))

    def map_rows(self, reorder: Callable[[np.ndarray], np.ndarray]) -> QuantizedTensor:
        """The same rows reordered (`reorder` takes and returns a row-major array of any width)."""

        def apply(t: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(reorder(t.numpy())))

        return replace(self, values=apply(self.values), scales=apply(self.scales),
                       mins=None if self.mins is None else apply(self.mins))

    def padded_rows(self, rows: int) -> QuantizedTensor:
        """Zero rows appended up to `rows` (a vocabulary padded to a multiple of the tensor-parallel size)."""
        missing = rows - self.shape[0]
        if missing == 0:
            return self

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(missing, t.shape[1])])

        return replace(self, values=pad(self.values), scales=pad(self.scales),
                       mins=None if self.mins is None else pad(self.mins))

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32: fma(scale, value, min) per weight (computed in float64, where the product is exact)."""
        scales = self.scales.double().repeat_interleave(self.group_size, dim=1)
        weight = scales * self.values.double()
        if self.mins is not None:
            weight += self.mins.double().repeat_interleave(self.group_size, dim=1)
        return weight.float()


def concat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Fused layers (q/k/v, gate/up) stack their shards. GGUF files mix types (Q4_K_M keeps some tensors in Q6_K):
    shards that differ are widened to 8-bit values with the smallest group size, which changes no weight."""
    if len({(part.bits, part.group_size, part.mins is None) for part in parts}) > 1:
        group = min(part.group_size for part in parts)
        parts = [_widen(part, group, with_mins=any(p.mins is not None for p in parts)) for part in parts]
    first = parts[0]
    mins = None if first.mins is None else torch.cat([p.mins for p in parts if p.mins is not None])
    return replace(first, values=torch.cat([p.values for p in parts]), scales=torch.cat([p.scales for p in parts]),
                   mins=mins, source="+".join(sorted({p.source for p in parts})))


def _widen(part: QuantizedTensor, group: int, with_mins: bool) -> QuantizedTensor:
    repeat = part.group_size // group
    mins = part.mins if part.mins is not None or not with_mins else torch.zeros_like(part.scales)
    return replace(part, values=part.values.to(torch.int8), bits=8, group_size=group,
                   scales=part.scales.repeat_interleave(repeat, dim=1),
                   mins=None if mins is None else mins.repeat_interleave(repeat, dim=1))


def quantize_weight(weight: torch.Tensor, mode: str) -> QuantizedTensor | None:
    """A float weight [N, K] quantized at load time: "int8" symmetric per output channel, "int4" asymmetric per group
    of 32 (scale (max - min) / 15, min = the group's min). None when K does not fit the mode's groups."""
    weight = weight.detach().float()
    out_features, in_features = weight.shape
    if mode == "int8":
        scales = weight.abs().amax(dim=1, keepdim=True) / 127  # [N, 1]
        safe = torch.where(scales == 0, torch.ones_like(scales), scales)
        values = torch.round(weight / safe).clamp(-127, 127).to(torch.int8)
        return QuantizedTensor(values, scales, None, bits=8, group_size=in_features, source="int8")
    if in_features % INT4_GROUP_SIZE:
        return None
    groups = weight.view(out_features, -1, INT4_GROUP_SIZE)  # [N, K / 32, 32]
    low, high = groups.amin(dim=2), groups.amax(dim=2)  # [N, K / 32]
    scales = (high - low) / 15
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    values = torch.round((groups - low.unsqueeze(2)) / safe.unsqueeze(2)).clamp(0, 15).to(torch.uint8)
    return QuantizedTensor(values.view(out_features, in_features), scales, low, bits=4, group_size=INT4_GROUP_SIZE,
                           source="int4")


@dataclass(frozen=True)
class QuantizedWeight:
    """A `QuantizedTensor` in quant_gemm.cpp's blocked layout; `descriptor` is the int64 table the kernels read."""

    data: torch.Tensor  # int8 [ceil(N/16), K, 16] or uint8 [ceil(N/16), K/2, 16]
    scales: torch.Tensor  # [ceil(N/16), K / group, 16] float32
    mins: torch.Tensor | None
    bits: int
    group_size: int
    out_features: int
    in_features: int
    descriptor: torch.Tensor  # int64 [5]: format, data, scales, mins, group

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, self.mins) if t is not None)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` dequantized, [len(ids), K] float32 (the embedding lookup of a quantized embedding)."""
        block, lane = ids // _BLOCK, ids % _BLOCK
        data = self.data[block, :, lane]  # [T, K] or [T, K/2]
        if self.bits == 4:
            data = torch.stack([data & 0x0F, data >> 4], dim=2).flatten(1)  # k even, k odd
        mins = None if self.mins is None else self.mins[block, :, lane]
        return QuantizedTensor(data, self.scales[block, :, lane], mins, self.bits, self.group_size, "").dequantize()


def can_pack(quantized: QuantizedTensor, weight: torch.Tensor) -> str | None:
    """Why the kernels cannot run this weight (None: they can)."""
    if weight.device.type != "cpu":
        return "the quantized kernels are CPU-only"
    if weight.dtype != torch.float32:
        return f"the quantized kernels take float32 activations, not {weight.dtype}"
    if cpu_kernels.library() is None:
        return "the CPU kernels are unavailable"
    if quantized.bits == 4 and quantized.group_size % 2:
        return "4-bit groups must hold an even number of values"
    return None


def pack(quantized: QuantizedTensor) -> QuantizedWeight:
    """[N, K] values -> 16 output rows interleaved per k (zero-padded to a multiple of 16 rows)."""
    out_features, in_features = quantized.shape
    padded = -(-out_features // _BLOCK) * _BLOCK

    def blocked(rows: torch.Tensor) -> torch.Tensor:  # [N, C] -> [padded / 16, C, 16]
        full = torch.zeros(padded, rows.shape[1], dtype=rows.dtype)
        full[:out_features] = rows
        return full.view(-1, _BLOCK, rows.shape[1]).transpose(1, 2).contiguous()

    values = quantized.values
    if quantized.bits == 4:
        values = values[:, 0::2] | (values[:, 1::2] << 4)  # [N, K/2]: k even low nibble
        data = blocked(values.to(torch.uint8))
    else:
        data = blocked(values.to(torch.int8))
    scales = blocked(quantized.scales.float())
    mins = None if quantized.mins is None else blocked(quantized.mins.float())
    descriptor = torch.tensor([_FORMAT_UINT4 if quantized.bits == 4 else _FORMAT_INT8, data.data_ptr(),
                               scales.data_ptr(), 0 if mins is None else mins.data_ptr(), quantized.group_size],
                              dtype=torch.int64)
    return QuantizedWeight(data, scales, mins, quantized.bits, quantized.group_size, out_features, in_features,
                           descriptor)
