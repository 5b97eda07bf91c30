"""CLIP's vision transformer (the image encoder of LLaVA): patches -> pre-norm ViT -> one layer's hidden states.

    pixel_values [n, 3, H, W] -> patch conv (stride = patch) -> [n, g*g, D] -> prepend CLS -> + positions
        -> pre_layrnorm -> [LayerNorm -> attention (bidirectional) -> +res -> LayerNorm -> MLP -> +res] x k
        -> hidden states after layer k  (k from LLaVA's `vision_feature_layer`; the layers above it never run)

Replicated on every tensor-parallel rank: a vision tower is small next to the language model, and each rank
then merges the same image embeddings without a collective.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str) -> Any:
    if name not in _ACTIVATIONS:
        raise NotImplementedError(f"vision tower activation {name!r} is not supported")
    return _ACTIVATIONS[name]


class ClipVisionEmbeddings(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size, bias=False)
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(num_positions, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [n, D, g, g]
        patches = patches.flatten(2).transpose(1, 2)  # [n, g*g, D]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)  # [n, 1, D]
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # [n, g*g + 1, D]


class ClipAttention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)  # [n, heads, length, hd]

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             scale=self.head_dim**-0.5)  # [n, heads, length, hd]
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))  # [n, length, D]


class ClipMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = ClipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipVisionTower(nn.Module):
    """The hidden states after encoder layer `feature_layer` (Hugging Face's `hidden_states[feature_layer]`:
    0 = the embeddings after pre_layrnorm, -1 = the last layer), CLS row included."""

    def __init__(self, config: Any, feature_layer: int) -> None:
        super().__init__()
        num_layers = config.num_hidden_layers
        self.num_layers_run = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
        if not 0 <= self.num_layers_run <= num_layers:
            raise ValueError(f"vision_feature_layer {feature_layer} is outside the tower's {num_layers} layers")
        self.embeddings = ClipVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder_layers = nn.ModuleList(ClipEncoderLayer(config) for _ in range(self.num_layers_run))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, 1 + (H / patch) * (W / patch), D]"""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder_layers:
            x = layer(x)
        return x

    @staticmethod
    def checkpoint_name(hf_name: str) -> str:
        """Our parameter name (under this module) for a CLIP vision tensor name ("vision_model." optional)."""
        name = hf_name.removeprefix("vision_model.")
        return "encoder_layers." + name.removeprefix("encoder.layers.") if name.startswith("encoder.layers.") else name
