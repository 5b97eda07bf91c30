"""Decode steps of a Llama-family model in one kernel call (workers/kernels/decoder_stack.cpp).

A decode step runs every layer on a few rows; layer by layer in Python, the module calls, views and ctypes calls
between the kernels take about a third of the forward at one sequence on a 2-core CPU. `DecodeStack` hands the
whole layer stack to one C++ function that calls the same kernels in the same order, so its output has the same
bits as the layer-by-layer path (a test checks this).

It serves only where every piece of the layer-by-layer path would itself be a fused kernel: float32 on CPU, all
projections in the blocked layout (AVX2 CPUs), one tensor-parallel rank (no all-reduce inside a layer), and a
step in which every request decodes one token. Everything else (prefill, mixed steps, other devices) keeps the
modules.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch

import workers.layers.cpu_gemm as cpu_gemm  # noqa: PLR0402
from workers.attention import AttentionMetadata
from workers.kernels import cpu as cpu_kernels

if TYPE_CHECKING:
    from workers.layers import ColumnParallelLinear, RowParallelLinear
    from workers.models.llama import LlamaDecoderLayer, LlamaModel

_LAYER_SLOTS = 12  # per layer: input norm, qkv, qkv bias, o, o bias, post norm, gate_up, its bias, down, its bias,
# k cache, v cache (decoder_stack.cpp's LayerSlot order)


class DecodeStack:
    """The layer stack of one `LlamaModel` as a table of addresses for `llama_decode_stack_f32`."""

    def __init__(self, model: LlamaModel) -> None:
        first = _layers(model)[0]
        attention = first.self_attn
        self.hidden_size = model.norm.weight.shape[0]
        self.num_heads, self.num_kv_heads, self.head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        down = first.mlp.down_proj.packed_weight
        assert isinstance(down, cpu_gemm.BlockedWeight)
        self.intermediate = down.blocks.shape[1]  # the down projection's input width
        self.eps, self.scale = first.input_layernorm.eps, attention.attn.scale
        self.final_norm = model.norm.weight
        self.cos_sin = attention.rotary_emb.cos_sin_cache
        self._weights = [_weight_addresses(layer) for layer in _layers(model)]  # [layers][10]
        self._table: torch.Tensor | None = None  # [layers, 12] int64, built for one set of caches
        self._table_caches: list[torch.Tensor] = []

    @staticmethod
    def supports(model: LlamaModel) -> bool:
        """Every layer's pieces are kernels of the library: float32, blocked projections, one rank."""
        if cpu_kernels.library() is None or not cpu_kernels.enabled(model.norm.weight):
            return False
        for layer in _layers(model):
            attention, mlp = layer.self_attn, layer.mlp
            projections: tuple[ColumnParallelLinear | RowParallelLinear, ...] = (
                attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if any(p.tp_size != 1 or not isinstance(p.packed_weight, cpu_gemm.BlockedWeight) for p in projections):
                return False
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            biases = [p.bias for p in projections if p.bias is not None]
            if not cpu_kernels.enabled(*norms, *biases, attention.rotary_emb.cos_sin_cache):
                return False
        return True

    def applies(self, hidden: torch.Tensor, kv_caches: list[torch.Tensor], metadata: AttentionMetadata) -> bool:
        """This step can run here: every request decodes one token into caches the kernels read."""
        cache = kv_caches[0]
        return (metadata.all_decode and hidden.dtype == torch.float32 and hidden.is_contiguous()
                and cache.numel() > 0 and cpu_kernels.cache_enabled(cache))

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 metadata: AttentionMetadata) -> torch.Tensor:
        """hidden [T, hidden] (the embedded tokens; overwritten) -> the final-normed hidden states [T, hidden]."""
        block_tables, seq_lens = metadata.decode_block_tables, metadata.decode_seq_lens
        assert block_tables is not None and seq_lens is not None and block_tables.is_contiguous()
        tokens = hidden.shape[0]
        block_size = kv_caches[0].shape[2]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        residual = torch.empty_like(hidden)
        scratch = torch.empty(tokens * (q_size + 2 * kv_size + q_size + 3 * self.intermediate), dtype=torch.float32)
        dims = torch.tensor([self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate,
                             block_size, block_tables.shape[1], int(kv_caches[0].dtype == torch.bfloat16)],
                            dtype=torch.int64)
        cpu_kernels.library().llama_decode_stack_f32(  # type: ignore[union-attr]
            hidden.data_ptr(), residual.data_ptr(), scratch.data_ptr(), self._layer_table(kv_caches).data_ptr(),
            len(self._weights), dims.data_ptr(), self.final_norm.data_ptr(), self.cos_sin.data_ptr(),
            positions.data_ptr(), metadata.slot_mapping.data_ptr(), block_tables.data_ptr(),
            seq_lens.data_ptr(), tokens, self.eps, self.scale)
        return hidden

    def _layer_table(self, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """Weight and cache addresses per layer; rebuilt only when the caches are other tensors."""
        same = len(self._table_caches) == len(kv_caches) and all(
            a is b for a, b in zip(self._table_caches, kv_caches, strict=True))
        if self._table is None or not same:
            rows = [[*weights, cache[0].data_ptr(), cache[1].data_ptr()]
                    for weights, cache in zip(self._weights, kv_caches, strict=True)]
            self._table = torch.tensor(rows, dtype=torch.int64)  # [layers, 12]
            assert self._table.shape[1] == _LAYER_SLOTS
            self._table_caches = list(kv_caches)
        return self._table


def _layers(model: LlamaModel) -> list[LlamaDecoderLayer]:
    return [cast("LlamaDecoderLayer", layer) for layer in model.layers]


def _weight_addresses(layer: LlamaDecoderLayer) -> list[int]:
    attention, mlp = layer.self_attn, layer.mlp

    def blocks(projection: ColumnParallelLinear | RowParallelLinear) -> int:
        packed = projection.packed_weight
        assert isinstance(packed, cpu_gemm.BlockedWeight)
        return packed.blocks.data_ptr()

    def bias(projection: ColumnParallelLinear | RowParallelLinear) -> int:
        return 0 if projection.bias is None else projection.bias.data_ptr()

    return [layer.input_layernorm.weight.data_ptr(), blocks(attention.qkv_proj), bias(attention.qkv_proj),
            blocks(attention.o_proj), bias(attention.o_proj), layer.post_attention_layernorm.weight.data_ptr(),
            blocks(mlp.gate_up_proj), bias(mlp.gate_up_proj), blocks(mlp.down_proj), bias(mlp.down_proj)]
