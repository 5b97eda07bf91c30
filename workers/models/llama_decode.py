"""Decode steps of a Llama-family model in one kernel call (workers/kernels/decoder_stack.cpp).

A decode step runs every layer on a few rows; layer by layer in Python, the module calls, views and ctypes calls
between the kernels take about a third of the forward at one sequence on a 2-core CPU. `DecodeStack` hands the
whole layer stack to one C++ function that calls the same kernels in the same order, so its output has the same
bits as the layer-by-layer path (a test checks this).

It serves only where every piece of the layer-by-layer path would itself be a fused kernel: float32 on CPU, all
projections in a kernel layout (blocked float32 on AVX2 CPUs, or quantized), one tensor-parallel rank or ranks on one host (the layer's two
all-reduces then go through the shared-memory collective from C++), and a step in which every request decodes
one token. Everything else (prefill, mixed steps, other devices, gloo across hosts) keeps the modules.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

import workers.layers.cpu_gemm as cpu_gemm  # noqa: PLR0402
from workers.attention import AttentionMetadata
from workers.distributed import tensor_parallel
from workers.kernels import cpu as cpu_kernels
from workers.layers import ColumnParallelLinear, RMSNorm, RowParallelLinear


@dataclass(frozen=True)
class DecoderLayerParts:
    """One decoder layer's modules, as the stack reads them (the model file says which are which)."""

    input_norm: RMSNorm
    qkv_proj: ColumnParallelLinear
    o_proj: RowParallelLinear
    post_norm: RMSNorm
    gate_up_proj: ColumnParallelLinear
    down_proj: RowParallelLinear

    @property
    def projections(self) -> tuple[ColumnParallelLinear | RowParallelLinear, ...]:
        return self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj


@dataclass(frozen=True)
class DecoderStackParts:
    """A Llama-family decoder body: its layers, final norm and the attention shape of this rank."""

    layers: list[DecoderLayerParts]
    final_norm: RMSNorm
    cos_sin: torch.Tensor  # [max_position, head_dim] rotary cache, cos then sin
    num_heads: int  # on this rank
    num_kv_heads: int  # on this rank
    head_dim: int
    scale: float

_MAX_BLOCKS = 6  # the one entry of the shape vector that changes per step (decoder_stack.cpp's kMaxBlocks)
_LAYER_SLOTS = 12  # per layer: input norm, qkv, qkv bias, o, o bias, post norm, gate_up, its bias, down, its bias,
# k cache, v cache (decoder_stack.cpp's LayerSlot order)


class DecodeStack:
    """A decoder body as a table of addresses for `llama_decode_stack_f32`."""

    def __init__(self, parts: DecoderStackParts) -> None:
        first = parts.layers[0]
        self.hidden_size = parts.final_norm.weight.shape[0]
        self.num_heads, self.num_kv_heads, self.head_dim = parts.num_heads, parts.num_kv_heads, parts.head_dim
        down = first.down_proj.packed_weight
        assert isinstance(down, cpu_gemm.KernelWeight)
        self.intermediate = down.in_features  # the down projection's input width
        self.eps, self.scale = first.input_norm.eps, parts.scale
        self.tp_rank, self.tp_size = first.o_proj.tp_rank, first.o_proj.tp_size
        self.final_norm = parts.final_norm.weight
        self.cos_sin = parts.cos_sin
        self._weights = [_weight_addresses(layer) for layer in parts.layers]  # [layers][10]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self._scratch_per_token = 2 * q_size + 2 * kv_size + 3 * self.intermediate  # qkv, attention, gate_up, act
        self._table: torch.Tensor | None = None  # [layers, 12] int64, built for one set of caches
        # decoder_stack.cpp's Dim order; max_blocks set per step. Plain memory, not a tensor: the stack is built
        # under the runner's inference mode and updated outside it as well.
        self._dims = (ctypes.c_int64 * 8)()
        self._table_caches: list[torch.Tensor] = []

    @staticmethod
    def supports(parts: DecoderStackParts) -> bool:
        """Every layer's pieces are kernels of the library: float32, blocked projections, one rank or ranks that share
        memory."""
        if cpu_kernels.library() is None or not cpu_kernels.enabled(parts.final_norm.weight, parts.cos_sin):
            return False
        tp_size = parts.layers[0].o_proj.tp_size
        if tp_size > 1 and tensor_parallel.shm_communicator() is None:
            return False
        for layer in parts.layers:
            if any(p.tp_size != tp_size or not isinstance(p.packed_weight, cpu_gemm.KernelWeight)
                   for p in layer.projections):
                return False
            biases = [p.bias for p in layer.projections if p.bias is not None]
            if not cpu_kernels.enabled(layer.input_norm.weight, layer.post_norm.weight, *biases):
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
        table = self._layer_table(kv_caches)
        self._dims[_MAX_BLOCKS] = block_tables.shape[1]
        residual = torch.empty_like(hidden)
        scratch = torch.empty(tokens * self._scratch_per_token, dtype=torch.float32)
        communicator = tensor_parallel.shm_communicator() if self.tp_size > 1 else None
        collective = communicator.native_fields() if communicator is not None else None
        cpu_kernels.library().llama_decode_stack_f32(  # type: ignore[union-attr]
            hidden.data_ptr(), residual.data_ptr(), scratch.data_ptr(), table.data_ptr(), len(self._weights),
            ctypes.addressof(self._dims), self.final_norm.data_ptr(), self.cos_sin.data_ptr(),
            positions.data_ptr(), metadata.slot_mapping.data_ptr(), block_tables.data_ptr(),
            seq_lens.data_ptr(), tokens, self.eps, self.scale, None if collective is None else collective.data_ptr())
        if communicator is not None and collective is not None:
            communicator.adopt_native_fields(collective)  # raises if a peer rank died mid-step
        return hidden

    def _layer_table(self, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """Weight and cache addresses per layer, and the shapes the caches fix; rebuilt only when the caches are
        other tensors."""
        same = len(self._table_caches) == len(kv_caches) and all(
            a is b for a, b in zip(self._table_caches, kv_caches, strict=True))
        if self._table is None or not same:
            rows = [[*weights, cache[0].data_ptr(), cache[1].data_ptr()]
                    for weights, cache in zip(self._weights, kv_caches, strict=True)]
            self._table = torch.tensor(rows, dtype=torch.int64)  # [layers, 12]
            assert self._table.shape[1] == _LAYER_SLOTS
            self._table_caches = list(kv_caches)
            cache = kv_caches[0]  # [2, blocks, block_size, kv_heads, head_dim], one dtype for all layers
            self._dims[:] = [self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate,
                             cache.shape[2], 0, int(cache.dtype == torch.bfloat16)]
        return self._table


def _weight_addresses(layer: DecoderLayerParts) -> list[int]:
    def blocks(projection: ColumnParallelLinear | RowParallelLinear) -> int:
        packed = projection.packed_weight
        assert isinstance(packed, cpu_gemm.KernelWeight)
        return packed.descriptor.data_ptr()

    def bias(projection: ColumnParallelLinear | RowParallelLinear) -> int:
        return 0 if projection.bias is None else projection.bias.data_ptr()

    return [layer.input_norm.weight.data_ptr(), blocks(layer.qkv_proj), bias(layer.qkv_proj), blocks(layer.o_proj),
            bias(layer.o_proj), layer.post_norm.weight.data_ptr(), blocks(layer.gate_up_proj), bias(layer.gate_up_proj),
            blocks(layer.down_proj), bias(layer.down_proj)]
