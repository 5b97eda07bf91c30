"""Matmuls against weights prepacked once into oneDNN's blocked layout (CPU only).

Decode steps multiply a few rows by every weight matrix; MKL's `F.linear` is far from memory-bound there.
A weight reordered once at load time for oneDNN runs 2-5x faster for small batches and ~20% faster for
prefill-sized ones (measured on this project's 2-core AVX-512 machine, float32). Elsewhere (CUDA, no oneDNN,
half precision, bfloat16 on a CPU without oneDNN's bfloat16 kernels, e.g. AVX2 only) layers keep plain `F.linear`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def can_prepack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in _PACKABLE_DTYPES and weight.dim() == 2
            and _onednn_linear_available()
            and (weight.dtype != torch.bfloat16 or _onednn_bf16_available()))


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


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """The same [out, in] matrix in oneDNN's layout: only `packed_linear` may read it afterwards."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")  # [n, out]


def linear(x: torch.Tensor, weight: torch.Tensor, packed_weight: torch.Tensor | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b through the packed weight when there is one."""
    if packed_weight is not None:
        return packed_linear(x, packed_weight, bias)
    return F.linear(x, weight, bias)
