"""Model registry: Hugging Face `architectures[0]` -> Conveyor's own torch implementation.

Every model implements `CausalLM`: a forward over a flattened batch (all scheduled tokens of all requests)
against the paged KV cache, returning hidden states; `compute_logits` turns the rows that sample into float32
logits. Pooling models (`--runner pooling`) implement `PoolingModel` instead: the same forward (encoders take
`token_type_ids` too and keep no KV cache), and `classify` for those with a classification head. A causal-LM
checkpoint served for pooling is built as its body alone ("embed") or its body plus a `score` head ("classify").
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from workers.attention import AttentionMetadata

# architecture -> (module under workers.models, class name)
_REGISTRY: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "LlamaForSequenceClassification": ("llama", "LlamaForSequenceClassification"),
    "MistralForSequenceClassification": ("llama", "LlamaForSequenceClassification"),
    "Qwen2ForSequenceClassification": ("llama", "Qwen2ForSequenceClassification"),
    "BertModel": ("bert", "BertModel"),
    "BertForSequenceClassification": ("bert", "BertForSequenceClassification"),
    "RobertaModel": ("bert", "RobertaModel"),
    "RobertaForSequenceClassification": ("bert", "RobertaForSequenceClassification"),
    "XLMRobertaModel": ("bert", "RobertaModel"),
    "XLMRobertaForSequenceClassification": ("bert", "RobertaForSequenceClassification"),
    "WhisperForConditionalGeneration": ("whisper", "WhisperForConditionalGeneration"),
    "LlavaForConditionalGeneration": ("llava", "LlavaForConditionalGeneration"),
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
}
# A causal LM served with `--runner pooling`: (architecture, convert) -> the class built instead.
_POOLING_CONVERSIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("LlamaForCausalLM", "embed"): ("llama", "LlamaForEmbedding"),
    ("MistralForCausalLM", "embed"): ("llama", "LlamaForEmbedding"),
    ("Qwen2ForCausalLM", "embed"): ("llama", "Qwen2ForEmbedding"),
    ("LlamaForCausalLM", "classify"): ("llama", "LlamaForSequenceClassification"),
    ("MistralForCausalLM", "classify"): ("llama", "LlamaForSequenceClassification"),
    ("Qwen2ForCausalLM", "classify"): ("llama", "Qwen2ForSequenceClassification"),
    ("LlavaForConditionalGeneration", "embed"): ("llava_pooling", "LlavaForEmbedding"),
    ("LlavaForConditionalGeneration", "classify"): ("llava_pooling", "LlavaForSequenceClassification"),
    ("Qwen2VLForConditionalGeneration", "embed"): ("qwen2_vl_pooling", "Qwen2VLForEmbedding"),
    ("Qwen2VLForConditionalGeneration", "classify"): ("qwen2_vl_pooling", "Qwen2VLForSequenceClassification"),
}
_GENERATIVE = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                         "WhisperForConditionalGeneration", "LlavaForConditionalGeneration",
                         "Qwen2VLForConditionalGeneration"})
# model_type fallback for configs without `architectures` (some GGUF-derived configs)
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "whisper": "WhisperForConditionalGeneration"}


class CausalLM(Protocol):
    num_layers: int
    num_kv_heads: int  # this rank's share
    head_dim: int

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden]; writes the tokens' K/V."""
        ...

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 attn_metadata: AttentionMetadata) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] float32 (all-gathered over tensor-parallel ranks)."""
        ...


class PoolingModel(Protocol):
    """A model served with `--runner pooling`. Its forward returns the final hidden states (after the final norm);
    `workers.layers.pooler` turns a prompt's rows into the answer."""

    num_layers: int
    num_kv_heads: int  # this rank's share
    head_dim: int
    uses_kv_cache: bool  # False for encoders: no cache to size or write, each prompt runs whole in one step
    num_labels: int  # > 0: `classify` is the model's classification head

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 attn_metadata: AttentionMetadata, **kwargs: Any) -> torch.Tensor: ...

    def classify(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, num_labels] float32 raw scores (replicated on every tensor-parallel rank)."""
        ...


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def resolve_architecture(hf_config: Any) -> str:
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if architectures and architectures[0] in _REGISTRY:
        return architectures[0]
    by_type = _MODEL_TYPES.get(getattr(hf_config, "model_type", ""))
    if not architectures and by_type:
        return by_type
    raise ValueError(f"model architecture {architectures or hf_config.model_type!r} is not supported; "
                     f"supported: {', '.join(supported_architectures())}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def model_class_name(hf_config: Any, runner: str = "generate", convert: str = "none") -> tuple[str, str]:
    """(module under workers.models, class) to build for this checkpoint and `ModelConfig.runner`/`convert`."""
    architecture = resolve_architecture(hf_config)
    if runner == "pooling" and architecture in _GENERATIVE:
        key = (architecture, "embed" if convert == "none" else convert)
        if key not in _POOLING_CONVERSIONS:
            raise ValueError(f"--convert {convert!r} is not supported for {architecture}")
        return _POOLING_CONVERSIONS[key]
    if runner != "pooling" and architecture not in _GENERATIVE:
        raise ValueError(f"{architecture} is a pooling model: it cannot generate text (serve it with --runner "
                         "pooling)")
    return _REGISTRY[architecture]


def build_model(hf_config: Any, model_path: str, dtype: torch.dtype, device: torch.device, tp_rank: int = 0,
                tp_size: int = 1, runner: str = "generate", convert: str = "none",
                quantization: str = "none") -> CausalLM:
    """Construct the model for `hf_config.architectures[0]` (a `CausalLM`, or also a `PoolingModel` when `runner`
    is "pooling") directly on `device` in `dtype` and load this rank's shard of the weights at `model_path` (Hugging
    Face folder or .gguf file). `quantization` (a resolved `ModelConfig.quantization`): "gguf" keeps a GGUF's
    quantized tensors quantized, "int8"/"int4" quantize the linear layers' float weights after loading."""
    from workers.loading.loader import iterate_weights

    module_name, class_name = model_class_name(hf_config, runner, convert)
    model_class = getattr(importlib.import_module(f"workers.models.{module_name}"), class_name)
    with torch.device(device), _default_dtype(dtype):
        model = model_class(hf_config, tp_rank=tp_rank, tp_size=tp_size)
    model.load_weights(iterate_weights(model_path, keep_quantized=quantization == "gguf"))
    for module in model.modules():
        if hasattr(module, "prepack"):
            module.prepack(quantization)
    model.eval()
    return model
