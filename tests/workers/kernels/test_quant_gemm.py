"""The weight-only quantized GEMM (workers/kernels/quant_gemm.cpp) and the GGUF block decoders feeding it.

The claims: every GGUF type kept quantized decodes to exactly gguf-py's dequantized values; the packed weight
multiplies exactly those values (bit for bit the float32 blocked GEMM on the dequantized weight); and each row of
a batch equals that row alone (batch invariance).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workers.kernels import cpu as cpu_kernels
from workers.layers import cpu_gemm
from workers.layers import quantized as quant
from workers.loading import gguf_quants

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="needs the CPU kernel library (a C++ compiler)")

GGUF_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]


def _gguf_bytes(type_name: str, rows: int, columns: int, seed: int) -> np.ndarray:
    """Valid blocks of `type_name`: gguf's quantizer where it has one, else random bytes with sane fp16 scales."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    generator = np.random.default_rng(seed)
    if type_name in ("Q8_0", "Q4_0", "Q4_1"):
        return gguf.quants.quantize(generator.standard_normal((rows, columns)).astype(np.float32), qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = generator.integers(0, 256, size=(rows * columns // block_size, type_size), dtype=np.uint8)
    scales = generator.uniform(0.001, 0.05, size=(blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
    if type_name == "Q6_K":
        blocks[:, 208:210] = scales[:, 0:2]  # d
    else:
        blocks[:, 0:4] = scales  # d, dmin
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("type_name", GGUF_TYPES)
def test_gguf_blocks_decode_to_gguf_py_values_and_multiply_exactly(type_name: str) -> None:
    import gguf

    rows, columns = 40, 512
    raw = _gguf_bytes(type_name, rows, columns, seed=GGUF_TYPES.index(type_name))
    reference = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(rows, columns)
    decoded = gguf_quants.decode(raw, type_name, rows, columns)
    assert torch.equal(decoded.dequantize(), torch.from_numpy(np.ascontiguousarray(reference)))
    packed = quant.pack(decoded)
    assert torch.equal(cpu_kernels.dequantize_packed(packed.descriptor, rows, columns), decoded.dequantize())
    float_blocked = cpu_gemm.BlockedWeight.of(cpu_kernels.block_weight(decoded.dequantize()), rows)
    x = torch.randn(7, columns)
    assert torch.equal(cpu_gemm.packed_linear(x, packed, None), cpu_gemm.packed_linear(x, float_blocked, None))


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("out_features,in_features,bias", [(48, 64, False), (37, 96, True), (100, 576, True),
                                                            (600, 1536, False)])
def test_quantized_linear_matches_f_linear_and_is_batch_invariant(mode: str, out_features: int, in_features: int,
                                                                  bias: bool) -> None:
    """Rows 1 (the in-register GEMV), 2..7 (dequantized panels, every tile tail), 97 and 200 (several panels),
    strided input rows; against F.linear on the dequantized weight, and every row against itself alone."""
    torch.manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features) * 0.1
    bias_t = torch.randn(out_features) if bias else None
    quantized = quant.quantize_weight(weight, mode)
    assert quantized is not None
    dequantized = quantized.dequantize()
    assert (dequantized - weight).abs().max() <= (0.01 if mode == "int8" else 0.1) * weight.abs().max()
    packed = quant.pack(quantized)
    for rows in (1, 2, 5, 6, 7, 13, 97, 200):
        x = torch.randn(rows, in_features + 3)[:, :in_features]
        out = cpu_gemm.packed_linear(x, packed, bias_t)
        torch.testing.assert_close(out, F.linear(x, dequantized, bias_t), rtol=1e-4, atol=1e-4)
        for row in {0, rows // 2, rows - 1}:
            assert torch.equal(cpu_gemm.packed_linear(x[row: row + 1], packed, bias_t), out[row: row + 1])


def test_fused_shards_of_different_types_keep_every_value() -> None:
    """A fused layer whose shards came in different GGUF types (Q4_K_M mixes Q4_K and Q6_K) is widened to 8-bit
    values and the smallest group: the same weights."""
    parts = [gguf_quants.decode(_gguf_bytes(name, 16, 256, seed=i), name, 16, 256)
             for i, name in enumerate(["Q4_K", "Q6_K", "Q8_0"])]
    fused = quant.concat_rows(parts)
    assert fused.bits == 8 and fused.group_size == 16
    assert torch.equal(fused.dequantize(), torch.cat([part.dequantize() for part in parts]))
    packed = quant.pack(fused)
    assert torch.equal(cpu_kernels.dequantize_packed(packed.descriptor, 48, 256), fused.dequantize())


def test_quantized_embedding_rows_are_the_dequantized_rows() -> None:
    for type_name in ("Q8_0", "Q4_1"):
        decoded = gguf_quants.decode(_gguf_bytes(type_name, 50, 64, seed=3), type_name, 50, 64)
        ids = torch.tensor([0, 17, 49, 17, 3])
        assert torch.equal(quant.pack(decoded).rows(ids), decoded.dequantize()[ids])
