"""Rotary position embeddings (GPT-NeoX "rotate half" layout, as in Hugging Face Llama checkpoints).

cos/sin are computed once in float32 for every position up to `max_position` and cast to the model dtype, the
same rounding Hugging Face applies. Supported `rope_type`s: default, linear, llama3; a config with an
`mrope_section` (Qwen2-VL) gets `MRotaryEmbedding`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from workers.kernels import cpu as cpu_kernels


def rope_config(hf_config: Any) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling parameters incl. 'rope_type') from a transformers 5 (`rope_parameters`) or an older
    (`rope_theta` + `rope_scaling`) config."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy_scaling = getattr(hf_config, "rope_scaling", None)
    if legacy_scaling:
        params = {**dict(legacy_scaling), **params}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    rope_type = params.get("rope_type", params.get("type", "default"))
    params["rope_type"] = rope_type
    return float(theta if theta is not None else 10000.0), params


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any], max_position: int) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling: long wavelengths divided by `factor`, short ones kept, a smooth
    blend between."""
    factor = params["factor"]
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params.get("original_max_position_embeddings", max_position)
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # [head_dim / 2]
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, inv_freq: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.head_dim = head_dim
        positions = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)  # [max_position]
        freqs = torch.outer(positions, inv_freq)  # [max_position, head_dim / 2]
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)  # [max_position, head_dim]
        self.cos_sin_cache: torch.Tensor
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim] -> rotated q and k: the
        same tensors rotated in place by the fused CPU kernel, copies otherwise."""
        if cpu_kernels.enabled(q, k, self.cos_sin_cache) and q.stride(-1) == k.stride(-1) == 1:
            cpu_kernels.rotary_neox_(q, k, positions, self.cos_sin_cache)
            return q, k
        cos, sin = self.cos_sin_cache.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)  # [T, 1, hd/2] each
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


class MRotaryEmbedding(RotaryEmbedding):
    """Qwen2-VL's multimodal rotary (M-RoPE): a token has three positions (temporal, height, width), and the
    rotary half's frequencies are cut into `sections`, section j turning by position j.

        frequencies:  | section 0: temporal | section 1: height | section 2: width |   (sum = head_dim / 2)

    Text tokens have three equal positions, which is plain rotary: 1-D `positions` [T] take the parent's path
    (and its fused kernel); [3, T] positions (a chunk holding image or video tokens) take the sectioned one."""

    def __init__(self, head_dim: int, max_position: int, inv_freq: torch.Tensor, dtype: torch.dtype,
                 sections: list[int]) -> None:
        super().__init__(head_dim, max_position, inv_freq, dtype)
        if sum(sections) != head_dim // 2:
            raise ValueError(f"mrope_section {sections} must add up to head_dim / 2 = {head_dim // 2}")
        section_of = torch.repeat_interleave(torch.arange(len(sections)), torch.tensor(sections))  # [head_dim / 2]
        self.section_of: torch.Tensor
        self.register_buffer("section_of", section_of.to(inv_freq.device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        num_tokens = positions.shape[1]
        cos_sin = self.cos_sin_cache[positions]  # [3, T, head_dim]
        pick = self.section_of.view(1, 1, -1).expand(1, num_tokens, -1)  # [1, T, head_dim / 2]
        cos, sin = (half.gather(0, pick)[0].unsqueeze(1) for half in cos_sin.chunk(2, dim=-1))  # [T, 1, hd/2]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # [num_tokens, heads, head_dim / 2] each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # [num_tokens, heads, head_dim]


def get_rope(hf_config: Any, head_dim: int, dtype: torch.dtype) -> RotaryEmbedding:
    """A RotaryEmbedding configured from a Hugging Face config (on the current default device)."""
    base, params = rope_config(hf_config)
    rope_type = params["rope_type"]
    max_position = int(getattr(hf_config, "max_position_embeddings", 8192))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # [head_dim / 2]
    inv_freq = 1.0 / (base**exponents)  # [head_dim / 2]
    if rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, params, max_position)
    elif rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type not in ("default", "mrope"):
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported (default, linear, llama3 are)")
    if params.get("mrope_section"):
        return MRotaryEmbedding(head_dim, max_position, inv_freq, dtype, list(params["mrope_section"]))
    return RotaryEmbedding(head_dim, max_position, inv_freq, dtype)
