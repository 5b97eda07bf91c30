"""Vocab-parallel token embedding and LM head.

The vocabulary is padded to a multiple of `tp_size` and each rank owns one contiguous slice of rows. The
embedding looks up the ids it owns and all-reduces (other ranks contribute zeros); the LM head computes its
slice of the logits and all-gathers them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import workers.layers.cpu_gemm as cpu_gemm  # noqa: PLR0402 (not via the package: it imports this module)
from workers.distributed import tensor_parallel


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
            return F.embedding(input_ids, self.weight)  # [num_tokens, hidden]
        owned = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)  # [num_tokens]
        local_ids = (input_ids - self.vocab_start) * owned  # [num_tokens]; ids owned elsewhere read row 0
        out = F.embedding(local_ids, self.weight) * owned.unsqueeze(-1).to(self.weight.dtype)  # [num_tokens, hidden]
        tensor_parallel.all_reduce(out)
        return out

    def load_weight(self, param_name: str, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        rows = self.vocab_end - self.vocab_start
        self.weight.data[:rows].copy_(loaded.narrow(0, self.vocab_start, rows))
        self.weight.data[rows:].zero_()


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states -> logits over the full vocabulary (float32)."""

    packed_weight: cpu_gemm.PackedWeight | None = None

    def prepack(self) -> None:
        """After loading: a packed copy for the logits matmul (the embedding may share `weight`)."""
        if cpu_gemm.can_prepack(self.weight):
            self.packed_weight = cpu_gemm.prepack(self.weight)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = cpu_gemm.linear(hidden, self.weight, self.packed_weight)  # [n, rows_per_rank]
        if self.tp_size > 1:
            logits = tensor_parallel.all_gather_last_dim(logits)  # [n, rows_per_rank * tp_size]
        return logits[:, : self.num_embeddings].float()  # [n, vocab]
