"""Matmuls against weights prepacked once at load time (CPU only).

Decode steps multiply a few rows by every weight matrix; MKL's `F.linear` is far from memory-bound there.
Two packed forms:
- On AVX2 CPUs (no AVX-512), float32: Conveyor's own blocked layout and GEMM (workers/kernels): 1.6-2.2x
  oneDNN's speed for one row, 1.1-1.3x for 16, about equal for prefill-sized batches (measured on the 2-core
  AVX2 EPYC), and batch-invariant: a row's result has the same bits whatever else is in the batch.
- Elsewhere with oneDNN (float32; bfloat16 where oneDNN has bfloat16 kernels): oneDNN's layout, 2-5x MKL's
  speed for small batches and ~20% faster for prefill-sized ones (measured on a 2-core AVX-512 machine).
Otherwise (CUDA, no oneDNN, half precision, bfloat16 on AVX2) layers keep plain `F.linear`.
Quantized weights (workers/layers/quantized.py) run through the same kernel library in a layout of the same shape.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.kernels import cpu as cpu_kernels
from workers.layers.quantized import QuantizedWeight

_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class BlockedWeight:
    """A weight in the kernel library's blocked layout (`cpu_kernels.block_weight`)."""

    blocks: torch.Tensor  # [ceil(out_features / 16), in_features, 16]
    out_features: int
    descriptor: torch.Tensor  # int64 [5], quant_gemm.cpp's weight table (format 0: float32 blocks)

    @property
    def in_features(self) -> int:
        return self.blocks.shape[1]

    @staticmethod
    def of(blocks: torch.Tensor, out_features: int) -> BlockedWeight:
        return BlockedWeight(blocks, out_features, torch.tensor([0, blocks.data_ptr(), 0, 0, 0], dtype=torch.int64))


KernelWeight = BlockedWeight | QuantizedWeight  # a weight the kernel library multiplies (the decode stack's kind)
PackedWeight = torch.Tensor | KernelWeight  # oneDNN's opaque tensor, or ours


def can_prepack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in _PACKABLE_DTYPES and weight.dim() == 2
            and (_blocked_gemm_preferred(weight) or (
                _onednn_linear_available() and (weight.dtype != torch.bfloat16 or _onednn_bf16_available()))))


def _blocked_gemm_preferred(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.float32 and _avx2_cpu() and cpu_kernels.library() is not None


@functools.cache
def _avx2_cpu() -> bool:
    """AVX2 is where the blocked GEMM was measured faster than oneDNN; with AVX-512 oneDNN keeps the job."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


@functools.cache
def _onednn_linear_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@functools.cache
def _onednn_bf16_available() -> bool:
    """oneDNN reorders bfloat16 weights only with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; it raises elsewhere."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def native_bf16_cpu() -> bool:
    """True when this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); elsewhere bfloat16 is converted on the
    fly and runs slower than float32."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and bool(probe()) for probe in probes)


def prepack(weight: torch.Tensor) -> PackedWeight:
    """The same [out, in] matrix in a packed layout (check `can_prepack` first): only `packed_linear` may read it
    afterwards."""
    if _blocked_gemm_preferred(weight):
        return BlockedWeight.of(cpu_kernels.block_weight(weight), weight.shape[0])
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def packed_linear(x: torch.Tensor, packed_weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(packed_weight, BlockedWeight | QuantizedWeight):
        return cpu_kernels.packed_linear(x, packed_weight.descriptor, packed_weight.out_features, bias)  # [n, out]
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")  # [n, out]


def linear(x: torch.Tensor, weight: torch.Tensor, packed_weight: PackedWeight | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b through the packed weight when there is one."""
    if packed_weight is not None:
        return packed_linear(x, packed_weight, bias)
    return F.linear(x, weight, bias)
