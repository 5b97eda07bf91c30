"""Qwen2-VL served with `--runner pooling` (multimodal embedders such as dse-qwen2-2b-mrl or VLM2Vec-Qwen2VL): the
same vision tower, patch merger, merge of image embeddings at the placeholders and M-RoPE positions
(`workers.multimodal`), in front of the language model's pooling variant instead of its causal LM.

    --convert embed     language model = Qwen2ForEmbedding: final hidden states after the norm, no lm_head
    --convert classify  language model = Qwen2ForSequenceClassification: the same plus the checkpoint's `score`
                        head ([num_labels, hidden], named `score.weight`)

`workers.layers.pooler` pools the rows (the last token by default) as for a text-only decoder.
"""
from __future__ import annotations

from typing import Any

import torch

from workers.models.llama import LlamaForEmbedding, Qwen2ForEmbedding, Qwen2ForSequenceClassification
from workers.models.qwen2_vl import Qwen2VLForConditionalGeneration


class Qwen2VLForEmbedding(Qwen2VLForConditionalGeneration):
    """Implements `workers.models.PoolingModel` and `workers.multimodal.MultiModalModel` (with `embed_grids` and
    `rope_positions`, inherited)."""

    language_class: type[LlamaForEmbedding] = Qwen2ForEmbedding

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(hf_config, tp_rank, tp_size)
        self.num_labels = int(self._language_body().num_labels)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is a pooling model: it has no language-model head")

    def classify(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, num_labels] float32 raw scores (the language model's head)."""
        return self._language_body().classify(rows)

    def load_weights(self, weights: Any) -> None:
        super().load_weights(weights)
        # A classification head learns its label count from the checkpoint's score.weight while loading.
        self.num_labels = int(self._language_body().num_labels)

    def _language_body(self) -> LlamaForEmbedding:
        assert isinstance(self.language_model, LlamaForEmbedding)
        return self.language_model


class Qwen2VLForSequenceClassification(Qwen2VLForEmbedding):
    language_class = Qwen2ForSequenceClassification
