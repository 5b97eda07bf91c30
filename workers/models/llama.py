"""Llama-family decoder-only models: Llama (SmolLM, Llama 2/3), Mistral, Qwen2 (q/k/v bias).

    input_ids -> embed -> [RMSNorm -> attention (fused qkv, rotary, paged SDPA) -> o_proj
                           -> +residual -> RMSNorm -> SwiGLU MLP (fused gate/up) -> down_proj -> +residual] x L
              -> RMSNorm -> hidden [num_tokens, hidden];  compute_logits: hidden -> LM head -> [n, vocab] float32

Pooling (`--runner pooling`): `LlamaForEmbedding` is the body alone (its hidden states are pooled);
`LlamaForSequenceClassification` adds the `score` head on the pooled row.

Weights arrive under Hugging Face names; q/k/v and gate/up are stacked into one parameter each at load time.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from workers.attention import Attention, AttentionMetadata
from workers.layers import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RMSNorm, RotaryEmbedding,
                            RowParallelLinear, SiluAndMul, VocabParallelEmbedding, get_rope)
from workers.loading.weights import load_hf_weights, raise_if_missing
from workers.models.llama_decode import DecodeStack, DecoderLayerParts, DecoderStackParts

logger = logging.getLogger(__name__)

# (fused parameter module, checkpoint module, shard id)
_STACKED_PARAMS: list[tuple[str, str, str | int]] = [
    ("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
]


def head_dim_of(hf_config: Any) -> int:
    return int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads)


class LlamaAttention(nn.Module):
    def __init__(self, hf_config: Any, rotary_emb: RotaryEmbedding, qkv_bias: bool, tp_rank: int, tp_size: int):
        super().__init__()
        hidden_size, head_dim = hf_config.hidden_size, head_dim_of(hf_config)
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        self.qkv_proj = QKVParallelLinear(hidden_size, head_dim, num_heads, num_kv_heads, qkv_bias, tp_rank, tp_size)
        o_bias = bool(getattr(hf_config, "attention_bias", False))
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, o_bias, tp_rank, tp_size)
        self.rotary_emb = rotary_emb
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # per rank
        self.head_dim = head_dim
        self.attn = Attention(self.num_heads, head_dim, self.num_kv_heads, scale=head_dim**-0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, (H + 2 * KVH) * hd]
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, H, hd]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, KVH, hd]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, KVH, hd]
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, kv_cache, metadata)  # [T, H * hd]
        return self.o_proj(out)  # [T, hidden]


class LlamaMLP(nn.Module):
    def __init__(self, hf_config: Any, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        hidden_size, intermediate_size = hf_config.hidden_size, hf_config.intermediate_size
        bias = bool(getattr(hf_config, "mlp_bias", False))
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"hidden_act {act!r} is not supported (only silu)")
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias, tp_rank, tp_size)
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, tp_rank, tp_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(hidden)))  # [T, hidden]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hf_config: Any, rotary_emb: RotaryEmbedding, qkv_bias: bool, tp_rank: int, tp_size: int):
        super().__init__()
        eps = hf_config.rms_norm_eps
        self.input_layernorm = RMSNorm(hf_config.hidden_size, eps)
        self.self_attn = LlamaAttention(hf_config, rotary_emb, qkv_bias, tp_rank, tp_size)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, eps)
        self.mlp = LlamaMLP(hf_config, tp_rank, tp_size)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: torch.Tensor, metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, residual stream); their sum is the layer's full output."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)  # [T, hidden] each
        else:
            hidden, residual = self.input_layernorm(hidden, residual)  # [T, hidden] each
        hidden = self.self_attn(positions, hidden, kv_cache, metadata)  # [T, hidden]
        hidden, residual = self.post_attention_layernorm(hidden, residual)  # [T, hidden] each
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, hf_config: Any, qkv_bias: bool, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size, tp_rank, tp_size)
        rotary_emb = get_rope(hf_config, head_dim_of(hf_config), torch.get_default_dtype())  # shared by layers
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hf_config, rotary_emb, qkv_bias, tp_rank, tp_size)
            for _ in range(hf_config.num_hidden_layers))
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.use_decode_stack = True  # scripts/profile_step.py turns it off to time the layers one by one

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """`inputs_embeds` [T, hidden] replaces the token embeddings (a multimodal model merged images in);
        `positions` is [T], or [3, T] for M-RoPE (`workers.layers.rotary.MRotaryEmbedding`)."""
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [T, hidden]
        # M-RoPE's 3-row positions (a chunk with image tokens) need the layers' own rotary
        stack = self._decode_stack_for_step(hidden, kv_caches, metadata) if positions.dim() == 1 else None
        if stack is not None:
            return stack(hidden, positions, kv_caches, metadata)  # [T, hidden]
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        hidden, _ = self.norm(hidden, residual)  # [T, hidden]
        return hidden

    def _stack_parts(self) -> DecoderStackParts:
        layers = [cast(LlamaDecoderLayer, layer) for layer in self.layers]
        attention = layers[0].self_attn
        return DecoderStackParts(
            [DecoderLayerParts(layer.input_layernorm, layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                               layer.post_attention_layernorm, layer.mlp.gate_up_proj, layer.mlp.down_proj)
             for layer in layers],
            self.norm, attention.rotary_emb.cos_sin_cache, attention.num_heads, attention.num_kv_heads,
            attention.head_dim, attention.attn.scale)

    @functools.cached_property
    def _decode_stack(self) -> DecodeStack | None:
        """Built at the first step, after the weights are packed; None where the stack cannot serve."""
        parts = self._stack_parts()
        stack = DecodeStack(parts) if DecodeStack.supports(parts) else None
        if stack is not None and stack.tp_rank == 0:
            logger.info("decode steps run all %d layers in one kernel call (decode stack)", len(self.layers))
        return stack

    def _decode_stack_for_step(self, hidden: torch.Tensor, kv_caches: list[torch.Tensor],
                               metadata: AttentionMetadata) -> DecodeStack | None:
        stack = self._decode_stack
        return stack if stack is not None and self.use_decode_stack and stack.applies(hidden, kv_caches,
                                                                                       metadata) else None


def _check_tensor_parallel_size(hf_config: Any, tp_size: int) -> None:
    """Each rank takes whole heads: say so up front instead of failing deep inside a layer."""
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    if num_heads % tp_size or num_kv_heads % tp_size:
        raise ValueError(f"--tensor-parallel-size {tp_size} must divide the model's {num_heads} attention heads and "
                         f"{num_kv_heads} key/value heads")


class _LlamaBody(nn.Module):
    """The decoder body and weight loading shared by the causal LM and the pooling variants. Construct under the
    target default device/dtype."""

    qkv_bias_default = False  # Qwen2 overrides: its q/k/v projections always carry a bias
    uses_kv_cache = True
    num_labels = 0

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        _check_tensor_parallel_size(hf_config, tp_size)
        qkv_bias = bool(getattr(hf_config, "attention_bias", self.qkv_bias_default)) or self.qkv_bias_default
        self.model = LlamaModel(hf_config, qkv_bias, tp_rank, tp_size)
        self.num_layers = hf_config.num_hidden_layers
        first_layer: LlamaDecoderLayer = self.model.layers[0]  # type: ignore[assignment]
        self.num_kv_heads, self.head_dim = first_layer.self_attn.num_kv_heads, first_layer.self_attn.head_dim
        _warn_sliding_window(hf_config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata)  # [T, hidden]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into this rank's (fused, sharded) parameters; every parameter must
        be covered."""
        self._check_all_loaded(load_hf_weights(
            self, weights, _fused_name,
            expected_unused=lambda name: name.startswith(self._unused_prefixes) or "rotary_emb" in name,
            take=self._load_head))

    # A tied model's lm_head.weight is the embedding's (Hugging Face behaves the same).
    _unused_prefixes: tuple[str, ...] = ("lm_head.weight",)

    def _load_head(self, name: str, tensor: torch.Tensor) -> bool:
        """A subclass's replicated head takes `name` here (True) instead of the sharded parameter path."""
        return False

    def _check_all_loaded(self, missing: set[str]) -> None:
        raise_if_missing(missing)


class LlamaForCausalLM(_LlamaBody):
    """Implements the `CausalLM` protocol of `workers.models`."""

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(hf_config, tp_rank, tp_size)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, tp_rank, tp_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)  # [n, vocab] float32


class LlamaForEmbedding(_LlamaBody):
    """A causal-LM checkpoint served for embeddings (`--convert embed`): the body's final (normed) hidden states,
    no LM head. Implements `workers.models.PoolingModel`."""

    _unused_prefixes: tuple[str, ...] = ("lm_head.", "score.")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is a pooling model: it has no language-model head")

    def classify(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no classification head")


class LlamaForSequenceClassification(LlamaForEmbedding):
    """The body plus `score` (a Linear without bias, applied to the pooled row: the last token by default), from a
    `*ForSequenceClassification` checkpoint or a causal LM carrying `score.weight` (`--convert classify`)."""

    _unused_prefixes: tuple[str, ...] = ("lm_head.",)

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(hf_config, tp_rank, tp_size)
        self.num_labels = int(getattr(hf_config, "num_labels", 2))
        # Replicated on every rank and kept in float32: the head is tiny and its output is the answer.
        self.score = nn.Linear(hf_config.hidden_size, self.num_labels, bias=False, dtype=torch.float32)

    def classify(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, num_labels] float32 raw scores."""
        return self.score(rows.float())

    def _load_head(self, name: str, tensor: torch.Tensor) -> bool:
        if name != "score.weight":
            return False
        if tensor.shape[0] != self.num_labels:  # a causal LM's config says nothing of the head it carries
            self.num_labels = int(tensor.shape[0])
            self.score = nn.Linear(tensor.shape[1], self.num_labels, bias=False, dtype=torch.float32,
                                   device=self.score.weight.device)
        self.score.weight.data.copy_(tensor)
        return True

    def _check_all_loaded(self, missing: set[str]) -> None:
        if "score.weight" in missing:
            raise ValueError("checkpoint has no score.weight: classification (--convert classify) needs a "
                             "`score` head of shape [num_labels, hidden_size] in the checkpoint")
        super()._check_all_loaded(missing)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias_default = True


class Qwen2ForEmbedding(LlamaForEmbedding):
    qkv_bias_default = True


class Qwen2ForSequenceClassification(LlamaForSequenceClassification):
    qkv_bias_default = True


def _fused_name(hf_name: str) -> tuple[str, str | int | None]:
    for fused, original, shard_id in _STACKED_PARAMS:
        if f".{original}." in hf_name:
            return hf_name.replace(f".{original}.", f".{fused}."), shard_id
    return hf_name, None


def _warn_sliding_window(hf_config: Any) -> None:
    window = getattr(hf_config, "sliding_window", None)
    enabled = getattr(hf_config, "use_sliding_window", True)  # Qwen2 has the flag; Mistral's window is always on
    if window and enabled:
        logger.warning("sliding_window=%s is not implemented: attention is full, exact only up to %s tokens",
                       window, window)


__all__ = ["LlamaForCausalLM", "LlamaForEmbedding", "LlamaForSequenceClassification", "MistralForCausalLM",
           "Qwen2ForCausalLM", "Qwen2ForEmbedding", "Qwen2ForSequenceClassification"]
