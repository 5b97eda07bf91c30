"""The fused float32 CPU kernels against the torch ops they replace (workers/kernels/cpu.py).

Tolerance: 2e-6 relative (a few float32 ulps) for the elementwise kernels, 2e-6 absolute for attention outputs of
order 1: the kernels follow the reference op by op, differing only in summation order and the exp approximation.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from workers.attention import Attention, build_attention_metadata
from workers.kernels import cpu as cpu_kernels
from workers.layers import cpu_gemm
from workers.layers.activation import SiluAndMul
from workers.layers.norm import RMSNorm
from workers.layers.rotary import _rotate

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C++ compiler: the kernels are off")
ELEMENTWISE_RTOL, ATTENTION_ATOL = 2e-6, 2e-6
REPO = Path(__file__).resolve().parents[3]


def _reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=ELEMENTWISE_RTOL, atol=ELEMENTWISE_RTOL)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_rms_norm_and_fused_residual_add(rows: int) -> None:
    torch.manual_seed(rows)
    hidden, eps = 576, 1e-5
    weight = torch.randn(hidden)
    wide = torch.randn(rows, hidden + 64)
    x = wide[:, :hidden]  # strided rows, as a slice of a wider output
    _close(cpu_kernels.rms_norm(x, weight, eps), _reference_rms_norm(x, weight, eps))

    x, residual = torch.randn(rows, hidden), torch.randn(rows, hidden)
    expected_residual = x + residual
    expected = _reference_rms_norm(expected_residual, weight, eps)
    cpu_kernels.fused_add_rms_norm_(x, residual, weight, eps)
    _close(residual, expected_residual)
    _close(x, expected)


def test_rmsnorm_layer_takes_the_kernel_and_matches_its_torch_path() -> None:
    norm = RMSNorm(64, eps=1e-6)
    norm.weight.data = torch.randn(64)
    x, residual = torch.randn(3, 64), torch.randn(3, 64)
    expected_sum = x + residual
    expected = _reference_rms_norm(expected_sum, norm.weight.data, 1e-6)
    normed, new_residual = norm(x.clone(), residual.clone())
    _close(normed, expected)
    _close(new_residual, expected_sum)


@pytest.mark.parametrize("tokens,num_heads,num_kv_heads", [(1, 9, 3), (7, 4, 4), (33, 8, 2)])
def test_rotary_in_place_on_fused_qkv_views(tokens: int, num_heads: int, num_kv_heads: int) -> None:
    torch.manual_seed(tokens)
    head_dim, max_position = 64, 128
    cos_sin = torch.randn(max_position, head_dim)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim)
    q = qkv[:, : num_heads * head_dim].view(tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim: (num_heads + num_kv_heads) * head_dim].view(tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, max_position, (tokens,))
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    expected_q, expected_k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    cpu_kernels.rotary_neox_(q, k, positions, cos_sin)
    _close(q, expected_q)
    _close(k, expected_k)


@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_silu_and_mul(tokens: int) -> None:
    torch.manual_seed(tokens)
    gate_up = torch.randn(tokens, 2 * 1536) * 6  # reaches the saturated ends of silu
    gate, up = gate_up.chunk(2, dim=-1)
    _close(SiluAndMul()(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_write_from_strided_views(cache_dtype: torch.dtype) -> None:
    """float32 rows copied; into a bfloat16 cache rounded exactly as torch's .to(torch.bfloat16) rounds."""
    torch.manual_seed(0)
    tokens, kv_heads, head_dim, num_blocks, block_size = 5, 2, 16, 4, 4
    kv_cache = torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=cache_dtype)
    kv = torch.randn(tokens, 3 * kv_heads * head_dim)
    k = kv[:, : kv_heads * head_dim].view(tokens, kv_heads, head_dim)
    v = kv[:, kv_heads * head_dim: 2 * kv_heads * head_dim].view(tokens, kv_heads, head_dim)
    slots = torch.tensor([9, 0, 15, 3, 4])
    cpu_kernels.write_kv_cache(kv_cache, k, v, slots)
    expected = torch.zeros_like(kv_cache)
    expected[0].view(-1, kv_heads, head_dim)[slots] = k.to(cache_dtype)
    expected[1].view(-1, kv_heads, head_dim)[slots] = v.to(cache_dtype)
    assert torch.equal(kv_cache, expected)


def _reference_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: list[list[int]],
                      seq_lens: list[int], scale: float) -> torch.Tensor:
    """Each sequence alone: gather its context token by token, then grouped-query SDPA."""
    block_size = kv_cache.shape[2]
    rows = []
    for i, (blocks, seq_len) in enumerate(zip(block_tables, seq_lens)):
        slots = [blocks[p // block_size] * block_size + p % block_size for p in range(seq_len)]
        k = kv_cache[0].flatten(0, 1)[slots].transpose(0, 1).unsqueeze(0)  # [1, kvh, L, hd]
        v = kv_cache[1].flatten(0, 1)[slots].transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(q[i].unsqueeze(0).unsqueeze(2), k, v, scale=scale, enable_gqa=True)
        rows.append(out[0, :, 0])  # [H, hd]
    return torch.stack(rows)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_lens,num_heads,num_kv_heads", [
    ([1], 4, 4), ([37], 9, 3), ([5, 16, 17, 100], 8, 2), ([60] * 3 + [1, 250], 6, 1), ([33] * 20, 9, 3)])
def test_paged_decode_attention(seq_lens: list[int], num_heads: int, num_kv_heads: int,
                                cache_dtype: torch.dtype) -> None:
    """Ragged lengths, partial last blocks, shuffled block ids, GQA groups 1-6, fewer and more sequences than
    threads (the kernel splits tasks by KV head in the first case); a bfloat16 cache is read as the float32
    values it holds."""
    torch.manual_seed(len(seq_lens) * num_heads)
    head_dim, block_size, num_blocks = 32, 16, 64
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim).to(cache_dtype)
    free = torch.randperm(num_blocks).tolist()
    block_tables = [[free.pop() for _ in range(-(-n // block_size))] for n in seq_lens]
    width = max(len(blocks) for blocks in block_tables)
    table = torch.tensor([blocks + [0] * (width - len(blocks)) for blocks in block_tables])
    q = torch.randn(len(seq_lens), num_heads + 2 * num_kv_heads, head_dim)[:, :num_heads]  # strided rows
    scale = head_dim**-0.5
    out = cpu_kernels.paged_decode_attention(q, kv_cache, table, torch.tensor(seq_lens), scale)
    expected = _reference_decode(q, kv_cache.float(), block_tables, seq_lens, scale)
    torch.testing.assert_close(out, expected, rtol=0, atol=ATTENTION_ATOL)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_attention_layer_decode_matches_its_torch_path(cache_dtype: torch.dtype) -> None:
    """The layer with the kernels (cache write + decode) against the same layer with CONVEYOR_CPU_KERNELS=0's
    path (index_copy_ + gathered SDPA), on a batch mixing a prefill and decodes, with a float32 or a bfloat16
    cache (--kv-cache-dtype)."""
    torch.manual_seed(3)
    num_heads, num_kv_heads, head_dim, block_size = 6, 2, 16, 4
    query_lens, seq_lens = [3, 1, 1], [3, 9, 6]
    block_tables = [[0], [1, 2, 3], [4, 5]]
    metadata = build_attention_metadata(query_lens, seq_lens, block_tables, block_size, torch.device("cpu"))
    attention = Attention(num_heads, head_dim, num_kv_heads, scale=head_dim**-0.5)
    cache = torch.randn(2, 6, block_size, num_kv_heads, head_dim).to(cache_dtype)
    q, k, v = torch.randn(5, num_heads, head_dim), torch.randn(5, num_kv_heads, head_dim), torch.randn(5, num_kv_heads, head_dim)
    fused_cache = cache.clone()
    fused = attention(q, k, v, fused_cache, metadata)
    # float64 queries take the torch path (a float32 cache is widened too; a bfloat16 one stays bfloat16)
    reference_cache = cache.clone().to(torch.float64 if cache_dtype == torch.float32 else cache_dtype)
    reference = attention(q.double(), k.double(), v.double(), reference_cache, metadata)
    torch.testing.assert_close(fused_cache, reference_cache.to(cache_dtype), rtol=0, atol=0)
    torch.testing.assert_close(fused, reference.float(), rtol=0, atol=ATTENTION_ATOL)


def test_disabled_by_environment_and_shares_torchs_openmp_runtime() -> None:
    """CONVEYOR_CPU_KERNELS=0 keeps torch ops; when loaded, the kernels use the libgomp torch loaded (one thread
    pool, sized by torch.set_num_threads), not a second OpenMP runtime."""
    code = ("from workers.kernels import cpu; import torch; print(cpu.library() is None, "
            "cpu.enabled(torch.zeros(1)))")
    env = {**os.environ, cpu_kernels.DISABLE_ENV: "0"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["True", "False"]
    gomp = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "gomp" in line}
    assert len(gomp) <= 1, gomp


@pytest.mark.parametrize("out_features,in_features,bias", [(48, 64, False), (37, 29, True), (1, 8, False),
                                                            (100, 576, True)])
def test_blocked_linear_matches_f_linear_for_every_batch_size(out_features: int, in_features: int,
                                                               bias: bool) -> None:
    """The blocked GEMM (any N, including N not a multiple of 16; rows 1, 2, 5, 6, 7, 13, 97, 200: the GEMV, every
    row tail of the 6-row tile, several 96-row panels; strided input rows; bias) against F.linear, and each row
    of a batch bit-identical to that row alone (one FMA chain per output)."""
    torch.manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features) * 0.1
    bias_t = torch.randn(out_features) if bias else None
    blocks = cpu_kernels.block_weight(weight)
    assert blocks.shape == (-(-out_features // 16), in_features, 16)
    packed = cpu_gemm.BlockedWeight.of(blocks, out_features)
    for rows in (1, 2, 5, 6, 7, 13, 97, 200):
        x = torch.randn(rows, in_features + 3)[:, :in_features]  # strided rows
        out = cpu_gemm.packed_linear(x, packed, bias_t)
        torch.testing.assert_close(out, F.linear(x, weight, bias_t), rtol=1e-5, atol=1e-5)
        for row in {0, rows // 2, rows - 1}:
            assert torch.equal(cpu_gemm.packed_linear(x[row: row + 1], packed, bias_t), out[row: row + 1])


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX2", reason="oneDNN keeps the job off AVX2")
def test_float32_layers_pack_for_the_blocked_gemm_on_avx2() -> None:
    assert isinstance(cpu_gemm.prepack(torch.randn(32, 16)), cpu_gemm.BlockedWeight)
