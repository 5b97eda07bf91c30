"""Fused float32 CPU kernels (cpu_kernels.cpp) and shared-memory collectives (shm_collectives.cpp): built once per
machine into one library, loaded with ctypes, wrapped for tensors (the collectives by workers/distributed).

The library is compiled with the system C++ compiler for the CPU it runs on (`-march=native`) and cached under
`$CONVEYOR_CACHE/kernels` (default ~/.cache/conveyor), keyed by the source, the compiler and the CPU's flags, so a
restart or a second worker loads it in milliseconds. Without a compiler, or with `CONVEYOR_CPU_KERNELS=0`, every
caller keeps its torch ops: the kernels are a fast path, never a requirement.

Callers check `enabled(*tensors)` (CPU, float32, library loaded) before calling a kernel; the kernels trust the
shapes they are given, so each wrapper asserts the layout it needs.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger("conveyor.kernels")

DISABLE_ENV = "CONVEYOR_CPU_KERNELS"  # "0" keeps every layer on plain torch ops
_SOURCES = [Path(__file__).with_name(name)
            for name in ("cpu_kernels.cpp", "quant_gemm.cpp", "decoder_stack.cpp", "shm_collectives.cpp")]
_HEADERS = [Path(__file__).with_name("blocked_tiles.h")]  # part of the cache key, not compiled on their own
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-shared", "-fPIC", "-std=c++17"]
_BUILD_TIMEOUT_S = 300

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "rms_norm_f32": [_P, _P, _P, _I, _I, _I, _F],
    "fused_add_rms_norm_f32": [_P, _P, _P, _I, _I, _F],
    "rotary_neox_f32": [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I],
    "silu_and_mul_f32": [_P, _P, _I, _I],
    "write_kv_cache_f32": [_P, _P, _P, _P, _P, _I, _I, _I, _I],
    "write_kv_cache_bf16": [_P, _P, _P, _P, _P, _I, _I, _I, _I],
    "paged_decode_attention_f32": [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _F],
    "paged_decode_attention_bf16": [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _F],
    "blocked_linear_f32": [_P, _P, _P, _P, _I, _I, _I, _I],
    "packed_linear_f32": [_P, _P, _P, _P, _I, _I, _I, _I],
    "dequantize_packed_f32": [_P, _P, _I, _I],
    "llama_decode_stack_f32": [_P, _P, _P, _P, _I, _P, _P, _P, _P, _P, _P, _P, _I, _F, _F, _P],
    "shm_all_reduce_f32": [_P, _I, _I, _I, _I, _P, _I],
    "shm_all_gather": [_P, _I, _I, _I, _I, _P, _P, _I],
}
_RETURNS_INT = {"shm_all_reduce_f32", "shm_all_gather", "llama_decode_stack_f32"}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("CONVEYOR_CACHE", Path.home() / ".cache" / "conveyor")) / "kernels"


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    sources = [source.read_text() for source in (*_SOURCES, *_HEADERS)]
    key = hashlib.sha256("\n".join([*sources, version, " ".join(_FLAGS), _cpu_flags()]).encode())
    target = _cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    logger.info("building the fused CPU kernels (once per machine) into %s", target.parent)
    # Workers may build at the same moment: each writes its own file and renames it into place.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([compiler, *_FLAGS, *map(str, _SOURCES), "-o", str(built)], check=True, capture_output=True,
                       text=True, timeout=_BUILD_TIMEOUT_S)
        os.replace(built, target)
    logger.info("built the fused CPU kernels in %.1f s", time.monotonic() - started)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (disabled, no compiler, or the build failed: logged once)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        logger.info("%s=0: fused CPU kernels off, layers use torch ops", DISABLE_ENV)
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        logger.warning("no C++ compiler found: fused CPU kernels off, layers use torch ops (slower)")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("fused CPU kernels unavailable, layers use torch ops (slower): %s", str(detail)[-2000:])
        return None
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, (_I if name in _RETURNS_INT else None)
    return lib


def enabled(*tensors: torch.Tensor) -> bool:
    """True when every tensor is a float32 CPU tensor and the kernels are loaded."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and library() is not None


def cache_enabled(kv_cache: torch.Tensor) -> bool:
    """True when the cache kernels can write and read `kv_cache` (CPU, float32 or bfloat16 elements)."""
    return kv_cache.device.type == "cpu" and kv_cache.dtype in _CACHE_SUFFIX and library() is not None


_CACHE_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _lib() -> ctypes.CDLL:
    lib = library()
    assert lib is not None, "check enabled() before calling a kernel"
    return lib


def _rows_of(x: torch.Tensor) -> int:
    """Row stride of a [rows, ...] tensor whose trailing dimensions are contiguous."""
    assert x.stride(-1) == 1 and (x.dim() < 3 or x.stride(-2) == x.shape[-1]), "trailing dims must be contiguous"
    return x.stride(0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [rows, hidden] -> weight * x / rms(x), a new contiguous tensor."""
    rows, hidden = x.shape
    out = torch.empty(rows, hidden, dtype=x.dtype)
    _lib().rms_norm_f32(out.data_ptr(), x.data_ptr(), weight.data_ptr(), rows, hidden, _rows_of(x), eps)
    return out


def fused_add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual += x, then x = rms_norm(residual). Both contiguous [rows, hidden]."""
    assert x.is_contiguous() and residual.is_contiguous() and x.shape == residual.shape
    rows, hidden = x.shape
    _lib().fused_add_rms_norm_f32(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), rows, hidden, eps)


def rotary_neox_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """In place on q [T, Hq, hd] and k [T, Hk, hd] (token rows may be strided views of a fused qkv output)."""
    tokens, num_q_heads, head_dim = q.shape
    assert positions.dtype == torch.int64 and positions.is_contiguous() and cos_sin.is_contiguous()
    _lib().rotary_neox_f32(q.data_ptr(), k.data_ptr(), positions.data_ptr(), cos_sin.data_ptr(), tokens,
                           num_q_heads, k.shape[1], head_dim, _rows_of(q), _rows_of(k))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 * d] contiguous -> silu(gate) * up, [T, d]."""
    assert gate_up.is_contiguous()
    tokens, width = gate_up.shape
    out = torch.empty(tokens, width // 2, dtype=gate_up.dtype)
    _lib().silu_and_mul_f32(out.data_ptr(), gate_up.data_ptr(), tokens, width // 2)
    return out


def write_kv_cache(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k/v [T, kvh, hd] into slots `slot_mapping` [T] of kv_cache [2, blocks, block_size, kvh, hd]."""
    assert kv_cache.is_contiguous() and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
    row_size = k.shape[1] * k.shape[2]
    write = getattr(_lib(), f"write_kv_cache_{_CACHE_SUFFIX[kv_cache.dtype]}")
    write(kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), k.data_ptr(), v.data_ptr(), slot_mapping.data_ptr(),
          k.shape[0], row_size, _rows_of(k), _rows_of(v))


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [D, H, hd] (one token per sequence) against each sequence's cached context -> [D, H, hd]."""
    seqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    assert kv_cache.is_contiguous() and block_tables.is_contiguous() and seq_lens.is_contiguous()
    assert block_tables.dtype == seq_lens.dtype == torch.int64 and num_heads % num_kv_heads == 0
    out = torch.empty(seqs, num_heads, head_dim, dtype=q.dtype)
    attend = getattr(_lib(), f"paged_decode_attention_{_CACHE_SUFFIX[kv_cache.dtype]}")
    attend(out.data_ptr(), q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), block_tables.data_ptr(),
           seq_lens.data_ptr(), seqs, num_heads, num_kv_heads, head_dim, block_size, block_tables.shape[1],
           _rows_of(q), scale)
    return out


BLOCK_COLUMNS = 16  # output rows interleaved per k in a blocked weight


def block_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] float32 -> [ceil(N / 16), K, 16]: each group of 16 output rows interleaved per k, zero-padded."""
    out_features, in_features = weight.shape
    padded = -(-out_features // BLOCK_COLUMNS) * BLOCK_COLUMNS
    blocked = torch.zeros(padded, in_features, dtype=torch.float32)
    blocked[:out_features] = weight
    return blocked.view(-1, BLOCK_COLUMNS, in_features).transpose(1, 2).contiguous()


def packed_linear(x: torch.Tensor, descriptor: torch.Tensor, out_features: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] (rows may be strided) times a packed weight (+ bias) -> [M, out_features]. `descriptor`: quant_gemm.cpp's
    int64 weight table (float32 blocks from `block_weight`, or a quantized weight of workers/layers/quantized.py)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, in_features = x.shape
    assert descriptor.dtype == torch.int64 and (bias is None or bias.is_contiguous())
    out = torch.empty(rows, out_features, dtype=torch.float32)
    _lib().packed_linear_f32(out.data_ptr(), x.data_ptr(), descriptor.data_ptr(),
                             None if bias is None else bias.data_ptr(), rows, out_features, in_features, x.stride(0))
    return out


def dequantize_packed(descriptor: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The packed weight's values as the GEMM multiplies them, [out_features, in_features] float32."""
    out = torch.empty(out_features, in_features, dtype=torch.float32)
    _lib().dequantize_packed_f32(out.data_ptr(), descriptor.data_ptr(), out_features, in_features)
    return out
