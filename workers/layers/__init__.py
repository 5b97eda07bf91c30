"""Building blocks shared by the model files: tensor-parallel linear layers, vocab-parallel embeddings,
RMSNorm, rotary embeddings and the SwiGLU activation; the pooling head of pooling models is pooler.py."""
from __future__ import annotations

from workers.layers.activation import SiluAndMul
from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from workers.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from workers.layers.norm import RMSNorm
from workers.layers.rotary import RotaryEmbedding, get_rope

__all__ = [
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "RowParallelLinear",
    "SiluAndMul",
    "VocabParallelEmbedding",
    "get_rope",
]
