"""LLaVA: a CLIP vision tower and a two-layer projector in front of a Llama-family language model.

    image -> (frontend: resize, crop, normalize) -> pixel_values [3, S, S]
          -> vision tower (hidden states of `vision_feature_layer`, CLS dropped for the "default" strategy)
          -> projector (linear, GELU, linear) -> [(S / patch)^2, hidden] image embeddings
    prompt:  ... USER: <image> x (S / patch)^2  What is this? ASSISTANT:
             the image's embeddings replace the embeddings of its placeholder tokens, then the language model
             runs as for text (paged KV cache, continuous batching, prefix caching, its own tensor parallelism)

The model runner calls `embed_images` for the items a step needs and `embed_input_ids` for the tokens, merges
them, and passes the result to `forward` as `inputs_embeds`.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from workers.attention import AttentionMetadata
from workers.models import model_class_name
from workers.models.clip_vision import ClipVisionTower, activation

_LANGUAGE_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                      ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."),
                      ("language_model.score.", "score."), ("score.", "score."))  # a classification head
_VISION_PREFIXES = ("vision_tower.", "model.vision_tower.")
_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


class LlavaProjector(nn.Module):
    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        bias = bool(getattr(hf_config, "multimodal_projector_bias", True))
        vision_size, text_size = hf_config.vision_config.hidden_size, hf_config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision_size, text_size, bias=bias)
        self.act = activation(hf_config.projector_hidden_act)
        self.linear_2 = nn.Linear(text_size, text_size, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class LlavaForConditionalGeneration(nn.Module):
    """Implements `workers.models.CausalLM` and `workers.models.MultiModalModel`."""

    uses_kv_cache = True
    num_labels = 0
    # (runner, convert) of the language model built inside: the pooling variants (llava_pooling.py) change it.
    language_runner: tuple[str, str] = ("generate", "none")

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        feature_layer = hf_config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise NotImplementedError("LLaVA with several vision feature layers is not supported")
        if getattr(hf_config.vision_config, "model_type", "clip_vision_model") != "clip_vision_model":
            raise NotImplementedError(f"LLaVA vision tower {hf_config.vision_config.model_type!r} is not supported "
                                      "(only CLIP)")
        module_name, class_name = model_class_name(hf_config.text_config, *self.language_runner)
        language_class = getattr(importlib.import_module(f"workers.models.{module_name}"), class_name)
        self.language_model = language_class(hf_config.text_config, tp_rank=tp_rank, tp_size=tp_size)
        self.vision_tower = ClipVisionTower(hf_config.vision_config, feature_layer)
        self.multi_modal_projector = LlavaProjector(hf_config)
        self.image_token_id = int(hf_config.image_token_index)
        self.drop_cls = hf_config.vision_feature_select_strategy == "default"
        self.num_layers = self.language_model.num_layers
        self.num_kv_heads, self.head_dim = self.language_model.num_kv_heads, self.language_model.head_dim

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids)  # [T, hidden]

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, tokens per image, hidden]: what replaces each image's placeholder tokens."""
        features = self.vision_tower(pixel_values)  # [n, 1 + patches, vision hidden]
        if self.drop_cls:
            features = features[:, 1:]
        return self.multi_modal_projector(features.to(self.multi_modal_projector.linear_1.weight.dtype))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.language_model.model(input_ids, positions, kv_caches, attn_metadata,
                                         inputs_embeds=inputs_embeds)  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)  # [n, vocab] float32

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hugging Face LLaVA names, old (`language_model.model.*`, `vision_tower.vision_model.*`) and new
        (`model.language_model.*`, `model.vision_tower.*`): the language model's go through its own loader."""
        own = dict(self.vision_tower.named_parameters(prefix="vision_tower"))
        own.update(self.multi_modal_projector.named_parameters(prefix="multi_modal_projector"))
        loaded: set[str] = set()

        def language_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for hf_name, tensor in weights:
                language_name = _language_name(hf_name)
                if language_name is not None:
                    yield language_name, tensor
                    continue
                name = _own_name(hf_name)
                if name in own:
                    own[name].data.copy_(tensor)
                    loaded.add(name)
                # else: a vision layer above the feature layer, or the unused post_layernorm

        self.language_model.load_weights(language_weights())
        missing = set(own) - loaded
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} vision weights, e.g. {sorted(missing)[:3]}")


def _language_name(hf_name: str) -> str | None:
    for prefix, replacement in _LANGUAGE_PREFIXES:
        if hf_name.startswith(prefix):
            return replacement + hf_name.removeprefix(prefix)
    return None


def _own_name(hf_name: str) -> str:
    for prefix in _VISION_PREFIXES:
        if hf_name.startswith(prefix):
            return "vision_tower." + ClipVisionTower.checkpoint_name(hf_name.removeprefix(prefix))
    for prefix in _PROJECTOR_PREFIXES:
        if hf_name.startswith(prefix):
            return "multi_modal_projector." + hf_name.removeprefix(prefix)
    return hf_name
