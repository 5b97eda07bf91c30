"""Tensor-parallel linear layers (Megatron style).

A column-parallel layer splits its output features across ranks (no communication; each rank keeps its slice),
a row-parallel layer splits its input features and all-reduces the partial sums. Attention and MLP blocks are
column-then-row, so each block costs one all-reduce. With `tp_size == 1` every layer is a plain `F.linear`.

Each layer knows how to cut its rank's shard out of a full Hugging Face checkpoint tensor: `load_weight(name,
tensor, shard_id)`. Fused layers (q/k/v, gate/up) take several checkpoint tensors, one per `shard_id`, so the
model runs one large matmul instead of three or two small ones. A quantized checkpoint tensor (`QuantizedTensor`)
is cut the same way and kept aside; `prepack(quantization)` then runs the layer on the quantized kernels, or
dequantizes it where they cannot run (another device, another activation dtype).
"""
from __future__ import annotations

import torch
from torch import nn

import workers.layers.cpu_gemm as cpu_gemm  # noqa: PLR0402 (not via the package: it imports this module)
from workers.distributed import tensor_parallel
import workers.layers.quantized as quant  # noqa: PLR0402 (not via the package, whose __init__ imports this module)


def divide(numerator: int, denominator: int) -> int:
    assert numerator % denominator == 0, f"{numerator} is not divisible by {denominator}"
    return numerator // denominator


class _ParallelLinear(nn.Module):
    """Holds `weight [out_per_rank, in_per_rank]` and optional `bias [out_per_rank]` on the default device/dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed_weight: cpu_gemm.PackedWeight | None = None  # set by prepack(); then `weight` is no longer read
        # Quantized checkpoint shards of this rank, by their first output row; `weight` is then never written.
        self._quantized_parts: dict[int, quant.QuantizedTensor] = {}
        self._float_weight_loaded = False

    def prepack(self, quantization: str = "none") -> None:
        """After loading: run on the quantized kernels (a quantized checkpoint, or `quantization` int8/int4 of a
        float one), else keep the weight only in a packed layout when that is faster (CPU)."""
        from_checkpoint = self._loaded_quantized()
        if self._quantized_parts and from_checkpoint is None:
            self._write_dequantized_parts("the layer also has float shards")
        quantized = from_checkpoint
        if quantized is None and quantization in ("int8", "int4"):
            quantized = quant.quantize_weight(self.weight, quantization)
        if quantized is not None:
            reason = quant.can_pack(quantized, self.weight)
            if reason is None:
                self.packed_weight = quant.pack(quantized)
                self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)
                self._quantized_parts.clear()
                return
            if from_checkpoint is not None:
                self._write_dequantized_parts(reason)
            else:
                quant.log_dequantized(quantized.source, reason)  # --quantization int8/int4: the float weights stay
        if cpu_gemm.can_prepack(self.weight):
            self.packed_weight = cpu_gemm.prepack(self.weight)
            self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)

    def _write_dequantized_parts(self, reason: str) -> None:
        """The quantized shards' values into the float weight (the plain path runs the checkpoint's values)."""
        for row, part in self._quantized_parts.items():
            quant.log_dequantized(part.source, reason)
            self.weight.data.narrow(0, row, part.shape[0]).copy_(part.dequantize())
        self._quantized_parts.clear()

    def _loaded_quantized(self) -> quant.QuantizedTensor | None:
        """The whole shard when every row of it came quantized (and no float part was loaded)."""
        parts = [self._quantized_parts[row] for row in sorted(self._quantized_parts)]
        if not parts or self._float_weight_loaded or sum(p.shape[0] for p in parts) != self.weight.shape[0]:
            return None
        return quant.concat_rows(parts)

    def _place(self, param_name: str, rows_at: int, part: torch.Tensor | quant.QuantizedTensor) -> None:
        """This rank's rows `part` go to rows `rows_at..` of the parameter (quantized weights are kept aside)."""
        if isinstance(part, quant.QuantizedTensor):
            assert param_name == "weight", "only weights come quantized"
            self._quantized_parts[rows_at] = part
            return
        self._float_weight_loaded |= param_name == "weight"
        getattr(self, param_name).data.narrow(0, rows_at, part.shape[0]).copy_(part)

    def load_weight(self, param_name: str, loaded: torch.Tensor | quant.QuantizedTensor,
                    shard_id: str | int | None = None) -> None:
        raise NotImplementedError


class ColumnParallelLinear(_ParallelLinear):
    """y = x W^T + b with W's output rows split across ranks; the output stays sharded."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(input_size, divide(output_size, tp_size), bias, tp_rank, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_gemm.linear(x, self.weight, self.packed_weight, self.bias)  # [num_tokens, out_per_rank]

    def load_weight(self, param_name: str, loaded: torch.Tensor | quant.QuantizedTensor,
                    shard_id: str | int | None = None) -> None:
        rows = getattr(self, param_name).shape[0]
        self._place(param_name, 0, loaded.narrow(0, self.tp_rank * rows, rows))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers with the same input fused into one matmul (gate_proj + up_proj).

    Each rank's weight is [shard_0 slice; shard_1 slice; ...], so `chunk(len(output_sizes))` of the output gives
    this rank's part of each original projection.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, tp_rank: int = 0,
                 tp_size: int = 1):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp_size)

    def load_weight(self, param_name: str, loaded: torch.Tensor | quant.QuantizedTensor,
                    shard_id: str | int | None = None) -> None:
        assert isinstance(shard_id, int), "merged layers load one shard at a time"
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        rows = self.output_sizes[shard_id] // self.tp_size
        self._place(param_name, offset, loaded.narrow(0, self.tp_rank * rows, rows))


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj, k_proj and v_proj fused; heads split across ranks.

    When there are fewer KV heads than ranks, each KV head is replicated on `tp_size // num_kv_heads` ranks.
    Output per rank: [q (num_heads/tp * head_dim) | k (kv_heads_per_rank * head_dim) | v (same)].
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1):
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp_size)  # per rank
        if tp_size >= num_kv_heads:
            self.num_kv_heads, self.num_kv_head_replicas = 1, divide(tp_size, num_kv_heads)
        else:
            self.num_kv_heads, self.num_kv_head_replicas = divide(num_kv_heads, tp_size), 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, output_size, bias, tp_rank, tp_size)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def load_weight(self, param_name: str, loaded: torch.Tensor | quant.QuantizedTensor,
                    shard_id: str | int | None = None) -> None:
        if shard_id == "q":
            offset, rows, shard_index = 0, self.q_size, self.tp_rank
        elif shard_id in ("k", "v"):
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            rows, shard_index = self.kv_size, self.tp_rank // self.num_kv_head_replicas
        else:
            raise ValueError(f"unknown q/k/v shard {shard_id!r}")
        self._place(param_name, offset, loaded.narrow(0, shard_index * rows, rows))


class RowParallelLinear(_ParallelLinear):
    """y = x W^T + b with W's input columns split across ranks; partial sums are all-reduced.

    The bias is added once, after the reduction.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(divide(input_size, tp_size), output_size, bias, tp_rank, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = cpu_gemm.linear(x, self.weight, self.packed_weight)  # [num_tokens, output_size]; partial when tp > 1
        if self.tp_size > 1:
            tensor_parallel.all_reduce(out)
        return out if self.bias is None else out + self.bias

    def load_weight(self, param_name: str, loaded: torch.Tensor | quant.QuantizedTensor,
                    shard_id: str | int | None = None) -> None:
        if param_name == "bias":
            assert isinstance(loaded, torch.Tensor)
            self.bias.data.copy_(loaded)  # type: ignore[union-attr]
            return
        cols = self.weight.shape[1]
        self._place(param_name, 0, loaded.narrow(1, self.tp_rank * cols, cols))  # across a group: dequantized
