"""Qwen2-VL: a ViT with 2-D rotary over native-resolution patch grids, a 2x2 patch merger, and a Qwen2 language
model whose rotary has three position rows (M-RoPE).

    image/video -> (frontend: smart resize, normalize, patchify) -> patches [t*h*w, 3*2*14*14], grid (t, h, w)
        -> patch embedding (a Conv3d whose kernel equals its stride: one matmul) -> [t*h*w, D]
        -> [LayerNorm -> attention within each frame (2-D rotary by patch row/column) -> +res
            -> LayerNorm -> MLP -> +res] x depth
        -> merger: LayerNorm, each 2x2 block of patches concatenated, MLP -> [t*h*w / 4, hidden]
    prompt:  ... <|vision_start|> <|image_pad|> x (t*h*w / 4) <|vision_end|> ...
             the embeddings replace the pads' embeddings; each pad gets positions (start + t', start + row,
             start + column) and the text after the item continues from start + max(h, w) / 2.

The vision tower is replicated on every tensor-parallel rank (as LLaVA's CLIP tower is); the language model is
sharded as usual.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.attention import AttentionMetadata
from workers.models.clip_vision import activation
from workers.models.llama import LlamaForCausalLM, LlamaForEmbedding, Qwen2ForCausalLM

if TYPE_CHECKING:
    from engine_core.protocol import MultiModalItem

_LANGUAGE_PREFIXES = (("model.language_model.", "model."), ("lm_head.", "lm_head."), ("model.", "model."))
_VISION_PREFIXES = ("model.visual.", "visual.")


class Qwen2VisionAttention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.embed_dim // config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_patches = x.shape[0]
        q, k, v = self.qkv(x).view(num_patches, 3, self.num_heads, self.head_dim).unbind(1)  # [N, H, d] each
        q, k = _rotate_vision(q, cos, sin), _rotate_vision(k, cos, sin)
        out = torch.empty_like(q)  # [N, H, d]
        for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):  # each frame attends to itself only
            fq, fk, fv = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, n, d] each
            out[start:end] = F.scaled_dot_product_attention(fq, fk, fv)[0].transpose(0, 1)
        return self.proj(out.reshape(num_patches, -1))  # [N, D]


class Qwen2VisionMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.fc1 = nn.Linear(config.embed_dim, hidden)
        self.act = activation(config.hidden_act)
        self.fc2 = nn.Linear(hidden, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Qwen2VisionBlock(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.attn = Qwen2VisionAttention(config)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.mlp = Qwen2VisionMLP(config)

    def forward(self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))  # [N, D]


class Qwen2PatchMerger(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.merged_size = config.embed_dim * config.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.merged_size, self.merged_size), nn.GELU(),
                                 nn.Linear(self.merged_size, config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged_size))  # [N / merge^2, hidden]


class Qwen2PatchEmbed(nn.Module):
    """Hugging Face's Conv3d with kernel = stride = one patch is a matmul over the patch's flattened values."""

    def __init__(self, patch_values: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(patch_values, embed_dim, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches.to(self.proj.weight.dtype))  # [N, D]


class Qwen2VisionTower(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.merge_size = config.spatial_merge_size
        patch_values = config.in_channels * config.temporal_patch_size * config.patch_size**2
        self.patch_embed = Qwen2PatchEmbed(patch_values, config.embed_dim)
        self.blocks = nn.ModuleList(Qwen2VisionBlock(config) for _ in range(config.depth))
        self.merger = Qwen2PatchMerger(config)
        head_dim = config.embed_dim // config.num_heads
        theta = float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        axis_dim = head_dim // 2  # half of each head turns by the patch row, half by the column
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float32)
                                                          / axis_dim), persistent=False)  # [head_dim / 4]

    def forward(self, patches: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """patches [N, 3 * t_patch * p * p] of the items in `grids` order -> [N / merge^2, hidden]."""
        x = self.patch_embed(patches)  # [N, D]
        cos, sin = self._rotary(grids)  # [N, head_dim] each
        cu_seqlens = [0]
        for t, h, w in grids:
            for _ in range(t):
                cu_seqlens.append(cu_seqlens[-1] + h * w)
        for block in self.blocks:
            x = block(x, cu_seqlens, cos, sin)
        return self.merger(x)

    def _rotary(self, grids: Sequence[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [N, head_dim] float32 by each patch's (row, column), patches ordered block by block of the
        merger's m x m blocks (the frontend's patch order)."""
        rows_cols = []
        m = self.merge_size
        for t, h, w in grids:
            rows = torch.arange(h).view(h // m, m, 1, 1).expand(-1, -1, w // m, m)  # [h/m, m, w/m, m]
            cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, -1, -1)  # [h/m, m, w/m, m]
            pairs = torch.stack([rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()], dim=-1)
            rows_cols.append(pairs.repeat(t, 1))  # [t*h*w, 2]
        positions = torch.cat(rows_cols).to(self.inv_freq.device)  # [N, 2]
        freqs = (positions[..., None].float() * self.inv_freq).flatten(1)  # [N, head_dim / 2]: rows, then cols
        angles = torch.cat([freqs, freqs], dim=-1)  # [N, head_dim]
        return angles.cos(), angles.sin()


def _rotate_vision(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary in float32 (as Hugging Face computes it), back in x's dtype. x [N, H, d]."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # [N, H, d]
    return (x32 * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).to(x.dtype)


class Qwen2VLForConditionalGeneration(nn.Module):
    """Implements `workers.models.CausalLM` and `workers.multimodal.MultiModalModel` (with `embed_grids` for
    variable-size items and `rope_positions` for M-RoPE)."""

    uses_kv_cache = True
    num_labels = 0
    # The language model built inside: the pooling variants (qwen2_vl_pooling.py) build its body instead.
    language_class: type[LlamaForCausalLM] | type[LlamaForEmbedding] = Qwen2ForCausalLM

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.language_model = self.language_class(hf_config.text_config, tp_rank=tp_rank, tp_size=tp_size)
        self.visual = Qwen2VisionTower(hf_config.vision_config)
        self.merge_size = int(hf_config.vision_config.spatial_merge_size)
        self.num_layers = self.language_model.num_layers
        self.num_kv_heads, self.head_dim = self.language_model.num_kv_heads, self.language_model.head_dim

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids)  # [T, hidden]

    def embed_grids(self, patches: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Each item's patches [t*h*w, values] -> its embeddings [t*h*w / merge^2, hidden], one encoder pass."""
        merged = self.visual(torch.cat(patches), grids)  # [sum of tokens, hidden]
        return list(merged.split([t * h * w // self.merge_size**2 for t, h, w in grids]))

    def rope_positions(self, items: Sequence[MultiModalItem]) -> tuple[torch.Tensor, int]:
        """M-RoPE positions of a prompt's tokens up to its last item's end, [3, end], and the shift of every later
        token (its position is its index + shift on all three rows)."""
        pieces, index, position = [], 0, 0
        for item in sorted(items, key=lambda item: item.offset):
            if item.grid_thw is None:
                raise ValueError(f"{item.modality} item at token {item.offset} carries no grid")
            text = item.offset - index
            pieces.append(torch.arange(position, position + text).expand(3, -1))  # [3, text]
            position += text
            t, h, w = item.grid_thw[0], item.grid_thw[1] // self.merge_size, item.grid_thw[2] // self.merge_size
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
            pieces.append(grid.reshape(3, -1) + position)  # [3, t*h*w]
            position += max(h, w)
            index = item.offset + item.length
        return torch.cat(pieces, dim=1), position - index

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.language_model.model(input_ids, positions, kv_caches, attn_metadata,
                                         inputs_embeds=inputs_embeds)  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)  # [n, vocab] float32

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hugging Face names, old (`visual.*`, `model.layers.*`) and new (`model.visual.*`,
        `model.language_model.*`): the language model's go through its own loader."""
        own = dict(self.visual.named_parameters())
        loaded: set[str] = set()

        def language_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for hf_name, tensor in weights:
                vision_name = _vision_name(hf_name)
                if vision_name is None:
                    yield _language_name(hf_name), tensor
                elif vision_name in own:
                    own[vision_name].data.copy_(tensor.reshape(own[vision_name].shape))  # Conv3d -> Linear
                    loaded.add(vision_name)

        self.language_model.load_weights(language_weights())
        missing = set(own) - loaded
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} vision weights, e.g. {sorted(missing)[:3]}")


def _vision_name(hf_name: str) -> str | None:
    for prefix in _VISION_PREFIXES:
        if hf_name.startswith(prefix):
            return hf_name.removeprefix(prefix)
    return None


def _language_name(hf_name: str) -> str:
    for prefix, replacement in _LANGUAGE_PREFIXES:
        if hf_name.startswith(prefix):
            return replacement + hf_name.removeprefix(prefix)
    return hf_name
