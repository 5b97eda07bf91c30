"""LLaVA served with `--runner pooling`: the same vision tower, projector and merge of image embeddings at the
placeholders (`workers.multimodal`), in front of the language model's pooling variant instead of its causal LM.

    --convert embed     language model = LlamaForEmbedding: final hidden states after the norm, no lm_head
    --convert classify  language model = LlamaForSequenceClassification: the same plus the checkpoint's `score`
                        head ([num_labels, hidden], named `score.weight` or `language_model.score.weight`)

`workers.layers.pooler` pools the rows (the last token by default) as for a text-only decoder.
"""
from __future__ import annotations

from typing import Any

import torch

from workers.models.llava import LlavaForConditionalGeneration


class LlavaForEmbedding(LlavaForConditionalGeneration):
    """Implements `workers.models.PoolingModel` and `workers.multimodal.MultiModalModel`."""

    language_runner = ("pooling", "embed")

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(hf_config, tp_rank, tp_size)
        self.num_labels = int(self.language_model.num_labels)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is a pooling model: it has no language-model head")

    def classify(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, num_labels] float32 raw scores (the language model's head)."""
        return self.language_model.classify(rows)

    def load_weights(self, weights: Any) -> None:
        super().load_weights(weights)
        # A classification head learns its label count from the checkpoint's score.weight while loading.
        self.num_labels = int(self.language_model.num_labels)


class LlavaForSequenceClassification(LlavaForEmbedding):
    language_runner = ("pooling", "classify")
