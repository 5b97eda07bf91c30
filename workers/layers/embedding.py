"""Vocab-parallel token embedding and LM head.

The vocabulary is padded to a multiple of `tp_size` and each rank owns one contiguous slice of rows. The
embedding looks up the ids it owns and all-reduces (other ranks contribute zeros); the LM head computes its
slice of the logits and all-gathers them.

A quantized checkpoint's embedding stays quantized: the rows the loader gives hang on the weight parameter, which a
tied LM head shares, so both use one packed copy (the head's matmul through the quantized kernels, the lookup by
dequantizing the looked-up rows).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import workers.layers.cpu_gemm as cpu_gemm  # noqa: PLR0402 (not via the package: it imports this module)
from workers.distributed import tensor_parallel
import workers.layers.quantized as quant  # noqa: PLR0402 (not via the package, whose __init__ imports this module)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.rows_per_rank = -(-num_embeddings // tp_size)
        self.vocab_start = tp_rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._lookup(input_ids)  # [num_tokens, hidden]
        owned = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)  # [num_tokens]
        local_ids = (input_ids - self.vocab_start) * owned  # [num_tokens]; ids owned elsewhere read row 0
        rows = self._lookup(local_ids)
        out = rows * owned.unsqueeze(-1).to(rows.dtype)  # [num_tokens, hidden]
        tensor_parallel.all_reduce(out)
        return out

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        packed = _packed_quantized(self.weight)
        return F.embedding(ids, self.weight) if packed is None else packed.rows(ids)

    def prepack(self, quantization: str = "none") -> None:
        _packed_quantized(self.weight)

    def load_weight(self, param_name: str, loaded: torch.Tensor | quant.QuantizedTensor,
                    shard_id: str | int | None = None) -> None:
        rows = self.vocab_end - self.vocab_start
        part = loaded.narrow(0, self.vocab_start, rows)
        if isinstance(part, quant.QuantizedTensor):
            self.weight.quantized = part.padded_rows(self.rows_per_rank)  # type: ignore[attr-defined]
            return
        self.weight.data[:rows].copy_(part)
        self.weight.data[rows:].zero_()


def _packed_quantized(weight: nn.Parameter) -> quant.QuantizedWeight | None:
    """The quantized rows the loader hung on `weight`, packed once (a tied head and embedding share them); None for a
    float weight, or after writing the values into `weight` where the kernels cannot run them."""
    quantized: quant.QuantizedTensor | None = getattr(weight, "quantized", None)
    if quantized is None:
        return None
    packed: quant.QuantizedWeight | None = getattr(weight, "packed_quantized", None)
    if packed is None:
        reason = quant.can_pack(quantized, weight)
        if reason is not None:
            quant.log_dequantized(quantized.source, reason)
            weight.data.copy_(quantized.dequantize())
            weight.quantized = None  # type: ignore[attr-defined]
            return None
        packed = quant.pack(quantized)
        weight.packed_quantized = packed  # type: ignore[attr-defined]
    return packed


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states -> logits over the full vocabulary (float32)."""

    packed_weight: cpu_gemm.PackedWeight | None = None

    def prepack(self, quantization: str = "none") -> None:
        """After loading: the quantized rows packed for the kernels, or a packed float copy for the logits matmul
        (the embedding may share `weight`). `--quantization int8|int4` leaves the head in float, as vLLM does."""
        self.packed_weight = _packed_quantized(self.weight)
        if self.packed_weight is None and cpu_gemm.can_prepack(self.weight):
            self.packed_weight = cpu_gemm.prepack(self.weight)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = cpu_gemm.linear(hidden, self.weight, self.packed_weight)  # [n, rows_per_rank]
        if self.tp_size > 1:
            logits = tensor_parallel.all_gather_last_dim(logits)  # [n, rows_per_rank * tp_size]
        return logits[:, : self.num_embeddings].float()  # [n, vocab]
