"""Paged attention over a flattened batch: the per-step metadata and the torch (SDPA) backend.

One step's tokens from all requests are concatenated into one `[num_tokens]` batch:

    flattened tokens:  | req 0: prefill chunk (q=5) | req 1: decode | req 2: decode | req 3: prefill (q=3) |
    query_start_loc:   0                            5               6               7                    10
    context (keys):    req 0 sees its cached prefix + the 5 new tokens (causal within the chunk);
                       a decode sees every token of its request so far, the new one included.

Each layer first writes the new tokens' K/V into the paged cache (`slot_mapping`), then reads the context back
through the block tables, whole blocks at a time (one contiguous copy per block, far cheaper than per-slot
gathers). Requests with query_len > 1 run one SDPA call each; all query_len == 1 requests run together in one
batched SDPA call with a padding mask. Half-precision attention runs in half precision, as in transformers.

In float32 on CPU the fused kernels (`workers.kernels.cpu`) take the cache write and the decode attention: the
decode kernel reads each request's blocks where they lie, so there is neither the gathered copy nor padding.

KV cache per layer: `[2, num_blocks, block_size, num_kv_heads, head_dim]` (0 = keys, 1 = values); token at
position p of a request lives in slot `block_ids[p // block_size] * block_size + p % block_size`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workers.kernels import cpu as cpu_kernels


@dataclass
class PrefillSpan:
    """One request with query_len > 1. `context_block_ids`/`mask` are None when the whole context is new (no
    cached prefix): then the fresh K/V are used directly with a plain causal mask."""

    token_start: int
    token_end: int
    seq_len: int
    context_block_ids: torch.Tensor | None = None  # [ceil(seq_len / block_size)] int64 blocks of the context
    mask: torch.Tensor | None = None  # [query_len, seq_len] bool, True = attend


@dataclass
class AttentionMetadata:
    """Built once per step by `build_attention_metadata`, read by every attention layer."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V is written
    query_start_loc: list[int]  # [num_reqs + 1] cumulative query lengths in the flattened batch
    seq_lens: list[int]  # [num_reqs] context length after this step
    block_tables: torch.Tensor  # [num_reqs, max_blocks_per_req] int64, padded with 0
    positions: torch.Tensor  # [num_tokens] int64 position of each token within its request
    prefills: list[PrefillSpan] = field(default_factory=list)
    decode_token_indices: torch.Tensor | None = None  # [num_decodes] rows of the flattened batch
    decode_block_tables: torch.Tensor | None = None  # [num_decodes, max_decode_blocks] int64, padding -> 0
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_decode_blocks * block_size] bool
    decode_seq_lens: torch.Tensor | None = None  # [num_decodes] int64 context length, the new token included
    all_decode: bool = False  # every request has query_len == 1: decode output is the whole batch, in order

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]


def build_attention_metadata(query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
                             block_size: int, device: torch.device) -> AttentionMetadata:
    """Flattened-batch metadata for one step. Request i contributes `query_lens[i]` tokens at positions
    `seq_lens[i] - query_lens[i] .. seq_lens[i] - 1`; its `block_tables[i]` must cover `seq_lens[i]` tokens."""
    num_reqs = len(query_lens)
    assert num_reqs == len(seq_lens) == len(block_tables) and num_reqs > 0
    for query_len, seq_len, blocks in zip(query_lens, seq_lens, block_tables):
        assert 0 < query_len <= seq_len <= len(blocks) * block_size, (query_len, seq_len, len(blocks))
    max_blocks = max(len(blocks) for blocks in block_tables)
    padded = [blocks + [0] * (max_blocks - len(blocks)) for blocks in block_tables]
    table = torch.tensor(padded, dtype=torch.int64)  # [num_reqs, max_blocks]
    query_lens_t = torch.tensor(query_lens, dtype=torch.int64)  # [num_reqs]
    query_start_loc = [0]
    for query_len in query_lens:
        query_start_loc.append(query_start_loc[-1] + query_len)
    req_of_token = torch.repeat_interleave(torch.arange(num_reqs), query_lens_t)  # [num_tokens]
    first_pos = torch.tensor(seq_lens, dtype=torch.int64) - query_lens_t  # [num_reqs]
    token_starts = torch.tensor(query_start_loc[:-1], dtype=torch.int64)  # [num_reqs]
    positions = torch.arange(query_start_loc[-1]) - token_starts[req_of_token] + first_pos[req_of_token]  # [T]
    slot_mapping = table[req_of_token, positions // block_size] * block_size + positions % block_size  # [T]

    metadata = AttentionMetadata(
        slot_mapping=slot_mapping.to(device), query_start_loc=query_start_loc, seq_lens=list(seq_lens),
        block_tables=table.to(device), positions=positions.to(device))
    _add_prefills(metadata, query_lens, seq_lens, table, block_size, device)
    _add_decodes(metadata, query_lens, seq_lens, table, block_size, device)
    return metadata


def _add_prefills(metadata: AttentionMetadata, query_lens: list[int], seq_lens: list[int], table: torch.Tensor,
                  block_size: int, device: torch.device) -> None:
    for i, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
        if query_len == 1:
            continue
        span = PrefillSpan(metadata.query_start_loc[i], metadata.query_start_loc[i + 1], seq_len)
        if seq_len > query_len:  # cached prefix: read the whole context from the cache
            span.context_block_ids = table[i, : -(-seq_len // block_size)].to(device)  # [num_context_blocks]
            ones = torch.ones(query_len, seq_len, dtype=torch.bool, device=device)  # [q, seq_len]
            span.mask = ones.tril(diagonal=seq_len - query_len)  # query j sits at position seq_len - q + j
        metadata.prefills.append(span)


def _add_decodes(metadata: AttentionMetadata, query_lens: list[int], seq_lens: list[int], table: torch.Tensor,
                 block_size: int, device: torch.device) -> None:
    decode_reqs = [i for i, query_len in enumerate(query_lens) if query_len == 1]
    if not decode_reqs:
        return
    decode_seq_lens = torch.tensor([seq_lens[i] for i in decode_reqs], dtype=torch.int64)  # [D]
    max_blocks = -(-int(decode_seq_lens.max()) // block_size)
    valid = torch.arange(max_blocks * block_size).unsqueeze(0) < decode_seq_lens.unsqueeze(1)  # [D, max_len]
    metadata.all_decode = len(decode_reqs) == len(query_lens)
    metadata.decode_token_indices = torch.tensor(
        [metadata.query_start_loc[i] for i in decode_reqs], dtype=torch.int64).to(device)  # [D]
    metadata.decode_block_tables = table[decode_reqs, :max_blocks].to(device)  # [D, max_blocks]
    metadata.decode_mask = valid[:, None, None, :].to(device)  # [D, 1, 1, max_len]
    metadata.decode_seq_lens = decode_seq_lens.to(device)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads over the paged cache (no parameters of its own)."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads, self.scale = num_heads, head_dim, num_kv_heads, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        """q: [T, num_heads, head_dim], k/v: [T, num_kv_heads, head_dim] -> [T, num_heads * head_dim].

        Writes k/v into `kv_cache` (skipped when the cache is empty, as in a profiling run)."""
        fused = cpu_kernels.enabled(q, k, v) and cpu_kernels.cache_enabled(kv_cache) and kv_cache.numel() > 0
        if fused:
            cpu_kernels.write_kv_cache(kv_cache, k, v, metadata.slot_mapping)
        elif kv_cache.numel() > 0:
            for i, new in ((0, k), (1, v)):  # the cache may hold another dtype (--kv-cache-dtype)
                kv_cache[i].view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, metadata.slot_mapping,
                                                                                   new.to(kv_cache.dtype))
        if metadata.all_decode:
            return self._decode(q, kv_cache, metadata, fused).flatten(1)  # [T, H * hd]
        out = torch.empty_like(q)  # [T, H, hd]
        for span in metadata.prefills:
            out[span.token_start:span.token_end] = self._prefill(q, k, v, kv_cache, span)
        if metadata.decode_token_indices is not None:
            q_decode = q.index_select(0, metadata.decode_token_indices)  # [D, H, hd]
            out.index_copy_(0, metadata.decode_token_indices, self._decode(q_decode, kv_cache, metadata, fused))
        return out.flatten(1)  # [T, H * hd]

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 span: PrefillSpan) -> torch.Tensor:
        q_span = q[span.token_start:span.token_end].transpose(0, 1).unsqueeze(0)  # [1, H, q, hd]
        if span.context_block_ids is None:
            k_ctx, v_ctx = k[span.token_start:span.token_end], v[span.token_start:span.token_end]  # [q, kvh, hd]
        else:
            k_ctx, v_ctx = (_gather_blocks(kv_cache[i], span.context_block_ids)[: span.seq_len]
                            for i in (0, 1))  # [seq_len, kvh, hd] each
        out = _sdpa(q_span, k_ctx.transpose(0, 1).unsqueeze(0), v_ctx.transpose(0, 1).unsqueeze(0),
                    span.mask, self.scale)  # [1, H, q, hd]
        return out[0].transpose(0, 1)  # [q, H, hd]

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                fused: bool) -> torch.Tensor:
        block_tables, mask, seq_lens = metadata.decode_block_tables, metadata.decode_mask, metadata.decode_seq_lens
        assert block_tables is not None and mask is not None and seq_lens is not None
        if fused:  # reads each request's blocks in place: no gathered copy, no padding
            return cpu_kernels.paged_decode_attention(q, kv_cache, block_tables, seq_lens, self.scale)  # [D, H, hd]
        if q.device.type == "cpu" and q.dtype != torch.float32:
            return self._decode_by_length(q, kv_cache, block_tables, seq_lens)
        num_decodes = block_tables.shape[0]
        block_ids = block_tables.flatten()  # [D * max_blocks]
        k_ctx, v_ctx = (_gather_blocks(kv_cache[i], block_ids).view(num_decodes, -1, self.num_kv_heads, self.head_dim)
                        for i in (0, 1))  # [D, max_len, kvh, hd] each
        out = _sdpa(q.unsqueeze(2),  # [D, H, 1, hd]
                    k_ctx.transpose(1, 2), v_ctx.transpose(1, 2),  # [D, kvh, max_len, hd]
                    mask, self.scale)  # [D, H, 1, hd]
        return out.squeeze(2)  # [D, H, hd]

    def _decode_by_length(self, q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                          seq_lens: torch.Tensor) -> torch.Tensor:
        """Half-precision decode on CPU: one SDPA call per distinct context length, keys trimmed to it. Padding
        the keys to a common length and masking changes how torch's kernel sums the softmax, and with it one
        output element in 3-7% of rows at short contexts: enough to move greedy tokens away from transformers'."""
        block_size = kv_cache.shape[2]
        lengths = seq_lens.tolist()
        out = torch.empty_like(q)  # [D, H, hd]
        for length in sorted(set(lengths)):
            rows = torch.tensor([i for i, other in enumerate(lengths) if other == length], device=q.device)  # [d]
            block_ids = block_tables.index_select(0, rows)[:, : -(-length // block_size)].flatten()
            k_ctx, v_ctx = (_gather_blocks(kv_cache[i], block_ids).view(len(rows), -1, self.num_kv_heads,
                                                                        self.head_dim)[:, :length]
                            for i in (0, 1))  # [d, length, kvh, hd] each
            group = F.scaled_dot_product_attention(
                q.index_select(0, rows).unsqueeze(2), k_ctx.transpose(1, 2).to(q.dtype), v_ctx.transpose(1, 2).to(q.dtype),
                scale=self.scale, enable_gqa=True)  # [d, H, 1, hd]
            out.index_copy_(0, rows, group.squeeze(2))
        return out


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, kvh, hd] -> the listed blocks' tokens, [len(block_ids) * bs, kvh, hd].

    One gather along the leading dimension per K and V copies whole contiguous blocks: about twice as fast on
    CPU as one gather along dimension 1 of the stacked [2, num_blocks, ...] cache."""
    return cache.index_select(0, block_ids).flatten(0, 1)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          scale: float) -> torch.Tensor:
    """SDPA with grouped KV heads; causal when `mask` is None. Keys and values read from a cache of another dtype
    are cast to the queries' dtype.

    Half precision stays half precision, on CPU too: torch's CPU flash attention rounds each key block's
    probabilities to bfloat16/float16 before they weight the values, and transformers runs that same kernel, so
    computing in float32 instead (about 80% of output elements equal) made greedy tokens drift from
    transformers' within a few layers. Measured on the 2-core AVX2 machine: as fast as float32 for a prefill,
    about 5x slower for a 16-request decode (no native bfloat16 matmul there; serve float32 on such CPUs)."""
    dtype = q.dtype
    return F.scaled_dot_product_attention(q, k.to(dtype), v.to(dtype), attn_mask=mask, is_causal=mask is None,
                                          scale=scale, enable_gqa=True)
