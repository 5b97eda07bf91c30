"""BERT-family encoders: BERT, RoBERTa and XLM-RoBERTa, bare (embeddings) or with a sequence-classification head.

    input_ids, positions, token_type_ids -> word + position + token-type embeddings -> LayerNorm
      -> [attention (fused qkv, bidirectional per request) -> out_proj -> +residual -> LayerNorm
          -> up_proj -> gelu -> down_proj -> +residual -> LayerNorm] x L -> hidden [num_tokens, hidden]
    classify (…ForSequenceClassification): row -> pooler dense -> tanh -> classifier -> [n, num_labels] float32

Encoders see every token of a request at once, so they keep no KV cache: the scheduler runs each prompt whole in
one step and `forward` checks that. The linear layers run on the flattened, unpadded rows. Attention on CPU runs
one SDPA call per request: measured on MiniLM-L6 shapes (1 thread) it beats one padded `[B, H, Lmax, hd]` call
with a key-padding mask for every batch tried (64 or 512 short sentences: 4.5 vs 5.4 ms, 17.6 vs 18.5 ms per
layer; one 500-token prompt among 31 short ones: 9 vs 247 ms), because padding allocates and copies the whole grid
and computes the padded work. On CUDA, where a call per request is launch-bound, the padded call is used
(`PaddedBatch`).

Weights arrive under Hugging Face names (`bert.`/`roberta.` prefix or none, as in a sentence-transformers folder);
RoBERTa's classification head (`classifier.dense`, `classifier.out_proj`) maps onto the same pooler + classifier.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.attention import AttentionMetadata
from workers.layers import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear, VocabParallelEmbedding
from workers.loading.weights import load_hf_weights, raise_if_missing


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact (erf), as transformers' "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
# Hugging Face module path fragment -> ours, with the q/k/v shard id; the first match wins (order matters).
_RENAMES: list[tuple[str, str, str | None]] = [
    (".attention.self.query.", ".attn.qkv_proj.", "q"),
    (".attention.self.key.", ".attn.qkv_proj.", "k"),
    (".attention.self.value.", ".attn.qkv_proj.", "v"),
    (".attention.output.dense.", ".attn.out_proj.", None),
    (".attention.output.LayerNorm.", ".attn_norm.", None),
    (".intermediate.dense.", ".up_proj.", None),
    (".output.dense.", ".down_proj.", None),
    (".output.LayerNorm.", ".mlp_norm.", None),
]
_HEAD_RENAMES = {"classifier.dense.": "pooler.dense.", "classifier.out_proj.": "classifier."}  # RoBERTa head
_IGNORED_PREFIXES = ("cls.", "lm_head.", "embeddings.position_ids")  # pretraining heads, buffers


# --------------------------------------------------------------------------- padding for attention


@dataclass
class PaddedBatch:
    """How the step's flattened rows map onto a padded `[num_reqs, max_len]` grid, built once per forward.

        flattened rows: | req 0 (3) | req 1 (5)     |          padded grid: req 0: t t t . .
                                                                             req 1: t t t t t
    `gather_rows`/`scatter_slots` are None when every request has the same length (the grid is a plain view)."""

    num_reqs: int
    max_len: int
    gather_rows: torch.Tensor | None  # [num_reqs * max_len] int64: the flattened row of each slot (pads read row 0)
    scatter_slots: torch.Tensor | None  # [num_tokens] int64: the slot of each flattened row
    key_mask: torch.Tensor | None  # [num_reqs, 1, 1, max_len] bool, True = a real token (attend)

    @classmethod
    def build(cls, query_start_loc: list[int], device: torch.device) -> PaddedBatch:
        lens = [end - start for start, end in zip(query_start_loc[:-1], query_start_loc[1:])]
        num_reqs, max_len = len(lens), max(lens)
        if all(length == max_len for length in lens):
            return cls(num_reqs, max_len, None, None, None)
        lens_t = torch.tensor(lens, dtype=torch.int64)  # [B]
        valid = torch.arange(max_len).unsqueeze(0) < lens_t.unsqueeze(1)  # [B, Lmax]
        starts = torch.tensor(query_start_loc[:-1], dtype=torch.int64)  # [B]
        gather = (starts.unsqueeze(1) + torch.arange(max_len)) * valid  # [B, Lmax]; pads -> row 0
        slots = valid.flatten().nonzero().squeeze(1)  # [T]: flattened rows are the valid slots, in order
        return cls(num_reqs, max_len, gather.flatten().to(device), slots.to(device),
                   valid[:, None, None, :].to(device))

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """[num_tokens, d] -> [num_reqs, max_len, d]."""
        if self.gather_rows is not None:
            rows = rows.index_select(0, self.gather_rows)
        return rows.view(self.num_reqs, self.max_len, -1)

    def unpad(self, grid: torch.Tensor) -> torch.Tensor:
        """[num_reqs, max_len, d] -> [num_tokens, d]."""
        flat = grid.reshape(self.num_reqs * self.max_len, -1)
        return flat if self.scatter_slots is None else flat.index_select(0, self.scatter_slots)


# --------------------------------------------------------------------------- layers


@dataclass
class EncoderBatch:
    """The step's request boundaries as attention needs them, built once per forward."""

    spans: list[tuple[int, int]]  # [start, end) rows of each request in the flattened batch
    padded: PaddedBatch | None  # CUDA: one padded SDPA call for all requests; CPU: None (one call per request)

    @classmethod
    def build(cls, query_start_loc: list[int], device: torch.device) -> EncoderBatch:
        spans = list(zip(query_start_loc[:-1], query_start_loc[1:]))
        padded = PaddedBatch.build(query_start_loc, device) if device.type != "cpu" and len(spans) > 1 else None
        return cls(spans, padded)


class BertAttention(nn.Module):
    def __init__(self, hf_config: Any, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        hidden_size, num_heads = hf_config.hidden_size, hf_config.num_attention_heads
        self.head_dim = hidden_size // num_heads
        self.qkv_proj = QKVParallelLinear(hidden_size, self.head_dim, num_heads, num_heads, True, tp_rank, tp_size)
        self.out_proj = RowParallelLinear(hidden_size, hidden_size, True, tp_rank, tp_size)
        self.num_heads = self.qkv_proj.num_heads  # this rank's share

    def forward(self, hidden: torch.Tensor, batch: EncoderBatch) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [T, 3 * H * hd]
        if batch.padded is not None:
            out = self._padded(qkv, batch.padded)  # [T, H * hd]
        else:
            out = qkv.new_empty(qkv.shape[0], self.num_heads * self.head_dim)  # [T, H * hd]
            for start, end in batch.spans:
                grid = qkv[start:end].view(1, end - start, 3, self.num_heads, self.head_dim)  # [1, L, 3, H, hd]
                q, k, v = grid.permute(2, 0, 3, 1, 4).unbind(0)  # [1, H, L, hd] each
                out[start:end] = _sdpa(q, k, v, None)[0].transpose(0, 1).flatten(1)  # [L, H * hd]
        return self.out_proj(out)  # [T, hidden]

    def _padded(self, qkv: torch.Tensor, padded: PaddedBatch) -> torch.Tensor:
        grid = padded.pad(qkv).view(padded.num_reqs, padded.max_len, 3, self.num_heads,
                                    self.head_dim)  # [B, Lmax, 3, H, hd]
        q, k, v = grid.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, Lmax, hd] each
        out = _sdpa(q, k, v, padded.key_mask)  # [B, H, Lmax, hd]
        return padded.unpad(out.transpose(1, 2))  # [T, H * hd]


class BertLayer(nn.Module):
    """Post-norm transformer block: LayerNorm after each residual add."""

    def __init__(self, hf_config: Any, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        hidden_size, eps = hf_config.hidden_size, hf_config.layer_norm_eps
        act = getattr(hf_config, "hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise NotImplementedError(f"hidden_act {act!r} is not supported ({', '.join(_ACTIVATIONS)} are)")
        self.act_fn = _ACTIVATIONS[act]
        self.attn = BertAttention(hf_config, tp_rank, tp_size)
        self.attn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.up_proj = ColumnParallelLinear(hidden_size, hf_config.intermediate_size, True, tp_rank, tp_size)
        self.down_proj = RowParallelLinear(hf_config.intermediate_size, hidden_size, True, tp_rank, tp_size)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, hidden: torch.Tensor, batch: EncoderBatch) -> torch.Tensor:
        hidden = self.attn_norm(hidden + self.attn(hidden, batch))  # [T, hidden]
        mlp = self.down_proj(self.act_fn(self.up_proj(hidden)))  # [T, hidden]
        return self.mlp_norm(hidden + mlp)  # [T, hidden]


class BertEmbeddings(nn.Module):
    def __init__(self, hf_config: Any, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        hidden_size = hf_config.hidden_size
        self.word_embeddings = VocabParallelEmbedding(hf_config.vocab_size, hidden_size, tp_rank, tp_size)
        self.position_embeddings = nn.Embedding(hf_config.max_position_embeddings, hidden_size)
        self.token_type_embeddings = nn.Embedding(max(int(hf_config.type_vocab_size), 1), hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=hf_config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None) -> torch.Tensor:
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # [T, hidden]
        if token_type_ids is None:  # segment 0 for every token: one broadcast row instead of a lookup
            hidden = hidden + self.token_type_embeddings.weight[0]
        else:
            hidden = hidden + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(hidden)  # [T, hidden]


class BertPooler(nn.Module):
    """dense + tanh on a pooled row (float32: see BertForSequenceClassification)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size, dtype=torch.float32)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(rows))  # [n, hidden]


# --------------------------------------------------------------------------- models


class BertModel(nn.Module):
    """An encoder without a KV cache; implements `workers.models.CausalLM`'s forward (kv_caches are ignored) and
    `PoolingModel`. Construct under the target default device/dtype."""

    uses_kv_cache = False
    num_labels = 0

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
            raise NotImplementedError(f"position_embedding_type {hf_config.position_embedding_type!r} is not "
                                      "supported (only absolute)")
        num_heads = hf_config.num_attention_heads
        if num_heads % tp_size:
            raise ValueError(f"--tensor-parallel-size {tp_size} must divide the model's {num_heads} attention heads")
        self.position_offset = self.position_offset_of(hf_config)
        self.embeddings = BertEmbeddings(hf_config, tp_rank, tp_size)
        self.layers = nn.ModuleList(BertLayer(hf_config, tp_rank, tp_size)
                                    for _ in range(hf_config.num_hidden_layers))
        self.num_layers = hf_config.num_hidden_layers
        self.head_dim = hf_config.hidden_size // num_heads
        self.num_kv_heads = num_heads // tp_size
        self.max_position = int(hf_config.max_position_embeddings) - self.position_offset

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions, token_type_ids: [num_tokens] -> hidden [num_tokens, hidden]. Every request's
        whole prompt must be in this step (an encoder has no cache to continue from)."""
        _check_whole_prompts(attn_metadata, self.max_position)
        batch = EncoderBatch.build(attn_metadata.query_start_loc, input_ids.device)
        hidden = self.embeddings(input_ids, positions + self.position_offset, token_type_ids)  # [T, hidden]
        for layer in self.layers:
            hidden = layer(hidden, batch)  # [T, hidden]
        return hidden

    @staticmethod
    def position_offset_of(hf_config: Any) -> int:
        return 0

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is a pooling model: it has no language-model head")

    def classify(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no classification head")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into this rank's (fused, sharded) parameters; every parameter must
        be covered."""
        unused = _IGNORED_PREFIXES + self._unused_prefixes()
        raise_if_missing(load_hf_weights(self, weights, _our_name, lambda name: name.startswith(unused)))

    def _unused_prefixes(self) -> tuple[str, ...]:
        return ("pooler.",)  # the bare model's pooler output is not an embedding (sentence-transformers agrees)


class BertForSequenceClassification(BertModel):
    """BERT + its pooler (dense + tanh) and classifier, applied by `classify` to pooled rows (the CLS row)."""

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(hf_config, tp_rank, tp_size)
        hidden_size, self.num_labels = hf_config.hidden_size, int(hf_config.num_labels)
        # Replicated on every rank and kept in float32: the head is tiny and its output is the answer.
        self.pooler = BertPooler(hidden_size)
        self.classifier = nn.Linear(hidden_size, self.num_labels, dtype=torch.float32)

    def classify(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, num_labels] float32 raw logits."""
        pooled = self.pooler(rows.float())  # [n, hidden]
        return self.classifier(pooled)  # [n, num_labels]

    def _unused_prefixes(self) -> tuple[str, ...]:
        return ()


def _roberta_position_offset(hf_config: Any) -> int:
    """RoBERTa numbers positions from padding_idx + 1 (a prompt carries no padding inside)."""
    pad_token_id = getattr(hf_config, "pad_token_id", None)
    return (1 if pad_token_id is None else int(pad_token_id)) + 1


class RobertaModel(BertModel):
    """RoBERTa and XLM-RoBERTa: BERT's layout with offset positions and one token type."""

    position_offset_of = staticmethod(_roberta_position_offset)


class RobertaForSequenceClassification(BertForSequenceClassification):
    position_offset_of = staticmethod(_roberta_position_offset)


# --------------------------------------------------------------------------- helpers


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Bidirectional SDPA; half precision on CPU runs in float32 (torch's CPU kernels are slow in bf16)."""
    dtype = q.dtype
    if q.device.type == "cpu" and dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask).to(dtype)  # [B, H, Lmax, hd]


def _check_whole_prompts(metadata: AttentionMetadata, max_position: int) -> None:
    starts, ends = metadata.query_start_loc[:-1], metadata.query_start_loc[1:]
    for start, end, seq_len in zip(starts, ends, metadata.seq_lens):
        if end - start != seq_len:
            raise ValueError(f"an encoder runs each prompt whole in one step, got {end - start} of {seq_len} tokens "
                             "(chunked prefill must be off for encoder models)")
        if seq_len > max_position:
            raise ValueError(f"prompt of {seq_len} tokens is longer than the model's {max_position} positions")


def _our_name(hf_name: str) -> tuple[str, str | None]:
    """`bert.encoder.layer.3.attention.self.query.weight` -> (`layers.3.attn.qkv_proj.weight`, "q")."""
    for prefix in ("bert.", "roberta."):
        if hf_name.startswith(prefix):
            hf_name = hf_name[len(prefix):]
            break
    for old, new in _HEAD_RENAMES.items():
        if hf_name.startswith(old):
            return new + hf_name[len(old):], None
    if hf_name.endswith((".gamma", ".beta")):  # TensorFlow-era LayerNorm names
        hf_name = hf_name.rsplit(".", 1)[0] + (".weight" if hf_name.endswith(".gamma") else ".bias")
    if not hf_name.startswith("encoder.layer."):
        return hf_name, None
    name = "layers." + hf_name[len("encoder.layer."):]
    for old, new, shard_id in _RENAMES:
        if old in name:
            return name.replace(old, new), shard_id
    return name, None


__all__ = ["BertForSequenceClassification", "BertModel", "RobertaForSequenceClassification", "RobertaModel"]
