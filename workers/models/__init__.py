"""Model registry: Hugging Face `architectures[0]` -> Conveyor's own torch implementation.

Every model implements `CausalLM`: a forward over a flattened batch (all scheduled tokens of all requests)
against the paged KV cache, returning hidden states; `compute_logits` turns the rows that sample into float32
logits.
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
}
# model_type fallback for configs without `architectures` (some GGUF-derived configs)
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


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


def build_model(hf_config: Any, model_path: str, dtype: torch.dtype, device: torch.device, tp_rank: int = 0,
                tp_size: int = 1) -> CausalLM:
    """Construct the model for `hf_config.architectures[0]` directly on `device` in `dtype` and load this rank's
    shard of the weights at `model_path` (Hugging Face folder or .gguf file)."""
    from workers.loader import iterate_weights

    module_name, class_name = _REGISTRY[resolve_architecture(hf_config)]
    model_class = getattr(importlib.import_module(f"workers.models.{module_name}"), class_name)
    with torch.device(device), _default_dtype(dtype):
        model = model_class(hf_config, tp_rank=tp_rank, tp_size=tp_size)
    model.load_weights(iterate_weights(model_path))
    for module in model.modules():
        if hasattr(module, "prepack"):
            module.prepack()
    return model.eval()
