"""Whisper (speech to text): an audio encoder run once per request, a text decoder over the paged KV cache.

    log-mel [N, mel, 3000] -> conv1 -> gelu -> conv2 (stride 2) -> gelu -> + sinusoidal positions [1500, d]
      -> [LN -> self-attention -> +res -> LN -> fc1 -> gelu -> fc2 -> +res] x E -> LN = encoder output [N, 1500, d]
      -> per decoder layer: K, V = kv_proj(encoder output), written once into the request's cross-attention slot

    decoder tokens (flattened batch) -> token + learned position embeddings
      -> [LN -> causal self-attention (paged KV cache) -> +res
          -> LN -> cross-attention (q from the token, K/V from the request's slot) -> +res
          -> LN -> fc1 -> gelu -> fc2 -> +res] x D -> LN -> hidden;  compute_logits: hidden @ embed_tokens^T

Cross-attention K/V live in `CrossAttentionCache`: per decoder layer one `[num_slots, heads, 1500, head_dim]` tensor
for keys and one for values; each running request owns one slot from its first step until it finishes or is
preempted (the model runner allocates and frees slots). A step's single-token (decode) rows attend together in one
SDPA call over slots 0..S-1 when they fill at least half of them (a query grid with zeros for absent slots: no
K/V is copied); otherwise, and for multi-token (prefill) rows, one call per request on its slot's view.

Weights arrive under Hugging Face names (`WhisperForConditionalGeneration`); q/k/v are fused at load time
(Hugging Face's k_proj has no bias: that part of the fused bias stays zero), `proj_out` is tied to the token
embedding. Tensor parallelism is not implemented (tp_size must be 1).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.attention import Attention, AttentionMetadata
from workers.layers import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear,
                            VocabParallelEmbedding)
from workers.layers.linear import ColumnParallelLinear
from workers.loading.weights import load_hf_weights, raise_if_missing


# (fused parameter module, checkpoint module, shard id); the first match wins.
_STACKED_PARAMS: list[tuple[str, str, str | int]] = [
    ("self_attn.qkv_proj", "self_attn.q_proj", "q"), ("self_attn.qkv_proj", "self_attn.k_proj", "k"),
    ("self_attn.qkv_proj", "self_attn.v_proj", "v"),
    ("encoder_attn.kv_proj", "encoder_attn.k_proj", 0), ("encoder_attn.kv_proj", "encoder_attn.v_proj", 1),
]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA ([B, H, q, hd] x [B, H, kv, hd]); half precision on CPU runs in float32 (much faster there)."""
    dtype = q.dtype
    if q.device.type == "cpu" and dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    return F.scaled_dot_product_attention(q, k, v).to(dtype)


class _Positions(nn.Module):
    """A position table under the checkpoint's `embed_positions.weight` name."""

    def __init__(self, num_positions: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_positions, dim), requires_grad=False)


class _MLP(nn.Module):
    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(dim, ffn_dim, bias=True)
        self.fc2 = RowParallelLinear(ffn_dim, dim, bias=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden)))  # [T, dim]


# --------------------------------------------------------------------------- cross-attention slots


class CrossAttentionCache:
    """Per-request cross-attention K/V, one slot per running request, grown by doubling (never copied per step).

    Invariant: a slot is in `free_slots` or owned by exactly one request; `keys[layer][slot]` is valid only while
    owned. When every slot is free the tensors are released."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, num_frames: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.shape = (num_heads, num_frames, head_dim)
        self.num_layers, self.dtype, self.device = num_layers, dtype, device
        self.keys: list[torch.Tensor] = []  # per layer [capacity, H, frames, hd]
        self.values: list[torch.Tensor] = []
        self.capacity = 0
        self.free_slots: set[int] = set()

    def allocate(self) -> int:
        """A free slot (the lowest, so decode batches stay dense at the front); grows the tensors when full."""
        if not self.free_slots:
            self._grow(max(4, 2 * self.capacity))
        slot = min(self.free_slots)
        self.free_slots.remove(slot)
        return slot

    def free(self, slot: int) -> None:
        assert 0 <= slot < self.capacity and slot not in self.free_slots, slot
        self.free_slots.add(slot)
        if len(self.free_slots) == self.capacity:
            self.keys, self.values, self.capacity, self.free_slots = [], [], 0, set()

    def _grow(self, capacity: int) -> None:
        def grown(old: torch.Tensor | None) -> torch.Tensor:
            new = torch.zeros((capacity, *self.shape), dtype=self.dtype, device=self.device)
            if old is not None:
                new[: old.shape[0]] = old
            return new

        old_keys: list[torch.Tensor | None] = list(self.keys) or [None] * self.num_layers
        old_values: list[torch.Tensor | None] = list(self.values) or [None] * self.num_layers
        self.keys = [grown(old) for old in old_keys]
        self.values = [grown(old) for old in old_values]
        self.free_slots |= set(range(self.capacity, capacity))
        self.capacity = capacity


@dataclass
class CrossAttentionBatch:
    """Which slot each row group of a step attends to, built once per forward.

    spans: (row_start, row_end, slot) attended one request at a time; grid: decode rows attended together in one
    call over slots 0..grid_size-1 (`grid_rows[i]` is the flattened row of slot `grid_slots[i]`). Rows of a request
    without a slot (slot < 0) are in neither: their cross-attention output is zero."""

    spans: list[tuple[int, int, int]] = field(default_factory=list)
    grid_rows: torch.Tensor | None = None  # [G] int64
    grid_slots: torch.Tensor | None = None  # [G] int64
    grid_size: int = 0

    @classmethod
    def build(cls, query_start_loc: list[int], slots: list[int], device: torch.device) -> CrossAttentionBatch:
        batch = cls()
        decode_rows, decode_slots = [], []
        for start, end, slot in zip(query_start_loc[:-1], query_start_loc[1:], slots, strict=True):
            if slot < 0:
                continue
            if end - start == 1:
                decode_rows.append(start)
                decode_slots.append(slot)
            else:
                batch.spans.append((start, end, slot))
        grid_size = max(decode_slots, default=-1) + 1
        if decode_rows and 2 * len(decode_rows) >= grid_size:
            batch.grid_rows = torch.tensor(decode_rows, dtype=torch.int64, device=device)
            batch.grid_slots = torch.tensor(decode_slots, dtype=torch.int64, device=device)
            batch.grid_size = grid_size
        else:  # sparse slots: a grid would attend mostly to absent requests
            batch.spans.extend((row, row + 1, slot) for row, slot in zip(decode_rows, decode_slots))
        return batch


# --------------------------------------------------------------------------- encoder


class WhisperEncoderAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv_proj = QKVParallelLinear(dim, self.head_dim, num_heads, num_heads, bias=True)
        self.out_proj = RowParallelLinear(dim, dim, bias=True)

    def forward(self, hidden: torch.Tensor, num_windows: int) -> torch.Tensor:
        """hidden: [N * frames, dim] (windows back to back) -> [N * frames, dim]; every frame sees its window."""
        q, k, v = (t.view(num_windows, -1, self.num_heads, self.head_dim).transpose(1, 2)  # [N, H, frames, hd]
                   for t in self.qkv_proj(hidden).chunk(3, dim=-1))
        out = _attend(q, k, v)  # [N, H, frames, hd]
        return self.out_proj(out.transpose(1, 2).reshape(hidden.shape))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        dim = hf_config.d_model
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = WhisperEncoderAttention(dim, hf_config.encoder_attention_heads)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.mlp = _MLP(dim, hf_config.encoder_ffn_dim)

    def forward(self, hidden: torch.Tensor, num_windows: int) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.self_attn_layer_norm(hidden), num_windows)
        return hidden + self.mlp(self.final_layer_norm(hidden))  # [N * frames, dim]


class WhisperEncoder(nn.Module):
    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        dim = hf_config.d_model
        self.conv1 = nn.Conv1d(hf_config.num_mel_bins, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.embed_positions = _Positions(hf_config.max_source_positions, dim)
        self.layers = nn.ModuleList(WhisperEncoderLayer(hf_config) for _ in range(hf_config.encoder_layers))
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: [N, mel, 2 * frames] -> [N, frames, dim]."""
        num_windows = features.shape[0]
        hidden = F.gelu(self.conv2(F.gelu(self.conv1(features))))  # [N, dim, frames]
        hidden = hidden.transpose(1, 2) + self.embed_positions.weight  # [N, frames, dim]
        flat = hidden.reshape(-1, hidden.shape[-1])  # [N * frames, dim]
        for layer in self.layers:
            flat = layer(flat, num_windows)
        return self.layer_norm(flat).view(hidden.shape)


# --------------------------------------------------------------------------- decoder


class WhisperDecoderSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv_proj = QKVParallelLinear(dim, self.head_dim, num_heads, num_heads, bias=True)
        self.out_proj = RowParallelLinear(dim, dim, bias=True)
        self.attn = Attention(num_heads, self.head_dim, num_heads, scale=self.head_dim**-0.5)

    def forward(self, hidden: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = (t.view(-1, self.num_heads, self.head_dim) for t in self.qkv_proj(hidden).chunk(3, dim=-1))
        return self.out_proj(self.attn(q, k, v, kv_cache, metadata))  # [T, dim]


class WhisperCrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = ColumnParallelLinear(dim, dim, bias=True)
        self.kv_proj = MergedColumnParallelLinear(dim, [dim, dim], bias=True)  # run once per request
        self.out_proj = RowParallelLinear(dim, dim, bias=True)

    def project_kv(self, encoder_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, frames, dim] -> keys, values [N, H, frames, hd] each."""
        num_windows, num_frames, dim = encoder_out.shape
        kv = self.kv_proj(encoder_out.reshape(-1, dim))  # [N * frames, 2 * dim]
        k, v = (t.reshape(num_windows, num_frames, self.num_heads, self.head_dim).transpose(1, 2)
                for t in kv.chunk(2, dim=-1))
        return k, v

    def forward(self, hidden: torch.Tensor, batch: CrossAttentionBatch, keys: torch.Tensor,
                values: torch.Tensor) -> torch.Tensor:
        """hidden [T, dim]; keys/values: this layer's slots [capacity, H, frames, hd] -> [T, dim]."""
        q = self.q_proj(hidden).view(-1, self.num_heads, self.head_dim)  # [T, H, hd]
        out = torch.zeros_like(q)  # rows of a request without a slot keep zeros
        for start, end, slot in batch.spans:
            q_span = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, n, hd]
            span_out = _attend(q_span, keys[slot:slot + 1], values[slot:slot + 1])  # [1, H, n, hd]
            out[start:end] = span_out[0].transpose(0, 1)
        if batch.grid_rows is not None and batch.grid_slots is not None:
            grid = q.new_zeros(batch.grid_size, self.num_heads, 1, self.head_dim)  # [S, H, 1, hd]
            grid.index_copy_(0, batch.grid_slots, q.index_select(0, batch.grid_rows).unsqueeze(2))
            grid_out = _attend(grid, keys[:batch.grid_size], values[:batch.grid_size])  # [S, H, 1, hd]
            out.index_copy_(0, batch.grid_rows, grid_out.index_select(0, batch.grid_slots).squeeze(2))
        return self.out_proj(out.flatten(1))


class WhisperDecoderLayer(nn.Module):
    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        dim, num_heads = hf_config.d_model, hf_config.decoder_attention_heads
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = WhisperDecoderSelfAttention(dim, num_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn = WhisperCrossAttention(dim, num_heads)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.mlp = _MLP(dim, hf_config.decoder_ffn_dim)

    def forward(self, hidden: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                cross: CrossAttentionBatch, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.self_attn_layer_norm(hidden), kv_cache, metadata)
        hidden = hidden + self.encoder_attn(self.encoder_attn_layer_norm(hidden), cross, keys, values)
        return hidden + self.mlp(self.final_layer_norm(hidden))  # [T, dim]


class WhisperDecoder(nn.Module):
    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.d_model)
        self.embed_positions = _Positions(hf_config.max_target_positions, hf_config.d_model)
        self.layers = nn.ModuleList(WhisperDecoderLayer(hf_config) for _ in range(hf_config.decoder_layers))
        self.layer_norm = nn.LayerNorm(hf_config.d_model)


class WhisperModel(nn.Module):
    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        self.encoder = WhisperEncoder(hf_config)
        self.decoder = WhisperDecoder(hf_config)


# --------------------------------------------------------------------------- the model


class WhisperForConditionalGeneration(nn.Module):
    """Implements `workers.models.CausalLM` for the decoder, plus the encoder-decoder hooks the model runner calls:
    `encode_into_slots` (a request's first step) and `cross_cache` (slot allocation). `forward` takes each
    request's slot (`cross_slots`, in step order; -1 = no cross-attention, as in a profiling run)."""

    uses_kv_cache = True
    num_labels = 0
    is_encoder_decoder = True

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        if tp_size != 1:
            raise ValueError(f"Whisper does not support tensor parallelism yet (got --tensor-parallel-size "
                             f"{tp_size}); serve it with -tp 1 (or several engines with --data-parallel-size)")
        self.model = WhisperModel(hf_config)
        self.proj_out = ParallelLMHead(hf_config.vocab_size, hf_config.d_model)
        self.proj_out.weight = self.model.decoder.embed_tokens.weight  # tied, as in every Whisper checkpoint
        self.num_layers = hf_config.decoder_layers
        self.num_kv_heads = hf_config.decoder_attention_heads
        self.head_dim = hf_config.d_model // hf_config.decoder_attention_heads
        self.num_mel_bins = hf_config.num_mel_bins
        self.max_positions = hf_config.max_target_positions
        self.num_frames = hf_config.max_source_positions
        weight = self.proj_out.weight
        # CPU attention runs in float32 (`_attend`): half-precision K/V there would be upcast at every step.
        cache_dtype = torch.float32 if weight.device.type == "cpu" else weight.dtype
        self.cross_cache = CrossAttentionCache(self.num_layers, self.num_kv_heads, self.head_dim, self.num_frames,
                                               cache_dtype, weight.device)
        for module in self.modules():  # k_proj has no bias in the checkpoint: its part of the fused bias stays 0
            if isinstance(module, (QKVParallelLinear, MergedColumnParallelLinear)) and module.bias is not None:
                module.bias.data.zero_()

    @property
    def decoder_layers(self) -> list[WhisperDecoderLayer]:
        return list(self.model.decoder.layers)  # type: ignore[arg-type]

    def encode_into_slots(self, features: torch.Tensor, slots: list[int]) -> None:
        """features [N, mel, 3000] (float32 log-mel) -> run the encoder, write each decoder layer's cross-attention
        K/V into `slots[i]` of `cross_cache` (allocated by the caller)."""
        assert features.shape[0] == len(slots)
        cache = self.cross_cache
        slot_index = torch.tensor(slots, dtype=torch.int64, device=cache.device)
        encoder_out = self.model.encoder(features.to(self.proj_out.weight.dtype))  # [N, frames, dim]
        for layer, keys, values in zip(self.decoder_layers, cache.keys, cache.values, strict=True):
            k, v = layer.encoder_attn.project_kv(encoder_out)  # [N, H, frames, hd] each
            keys.index_copy_(0, slot_index, k.to(keys.dtype))
            values.index_copy_(0, slot_index, v.to(values.dtype))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, cross_slots: list[int] | None = None) -> torch.Tensor:
        """input_ids, positions: [T] (decoder tokens) -> hidden [T, dim]; writes the tokens' self-attention K/V."""
        if max(attn_metadata.seq_lens, default=0) > self.max_positions:  # host-side: no device sync
            raise ValueError(f"Whisper's decoder has {self.max_positions} positions: --max-model-len must be at "
                             f"most {self.max_positions}")
        decoder = self.model.decoder
        num_reqs = len(attn_metadata.query_start_loc) - 1
        cross = CrossAttentionBatch.build(attn_metadata.query_start_loc, cross_slots or [-1] * num_reqs,
                                          input_ids.device)
        hidden = decoder.embed_tokens(input_ids) + decoder.embed_positions.weight[positions]  # [T, dim]
        empty = input_ids.new_empty(0)  # no slots allocated (profiling): no row attends
        keys = self.cross_cache.keys or [empty] * self.num_layers
        values = self.cross_cache.values or [empty] * self.num_layers
        for layer, kv_cache, layer_keys, layer_values in zip(self.decoder_layers, kv_caches, keys, values,
                                                             strict=True):
            hidden = layer(hidden, kv_cache, attn_metadata, cross, layer_keys, layer_values)
        return decoder.layer_norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj_out.compute_logits(hidden)  # [n, vocab] float32

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the (fused) parameters; every parameter must be covered."""
        # proj_out is tied to the token embedding.
        raise_if_missing(load_hf_weights(self, weights, _fused_name, lambda name: name == "proj_out.weight"))


def _fused_name(hf_name: str) -> tuple[str, str | int | None]:
    """Hugging Face name -> (our parameter name, shard id): fused q/k/v and k/v, and the MLP under `mlp.`."""
    for fused, original, shard_id in _STACKED_PARAMS:
        if f".{original}." in hf_name:
            return hf_name.replace(f".{original}.", f".{fused}."), shard_id
    for linear in ("fc1", "fc2"):
        if f".{linear}." in hf_name:
            return hf_name.replace(f".{linear}.", f".mlp.{linear}."), None
    return hf_name, None


__all__ = ["CrossAttentionBatch", "CrossAttentionCache", "WhisperForConditionalGeneration"]
