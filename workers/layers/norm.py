"""RMSNorm with an optional fused residual add (the pre-norm transformer pattern)."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalizes in float32 and casts back before the weight multiply, exactly as Hugging Face Llama does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual), the sum being the next
        residual stream."""
        if residual is not None:
            x = x + residual  # [num_tokens, hidden]
            residual = x
        input_dtype = x.dtype
        x32 = x.float()  # [num_tokens, hidden]
        variance = x32.pow(2).mean(-1, keepdim=True)  # [num_tokens, 1]
        normed = self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(input_dtype)  # [num_tokens, hidden]
        return normed if residual is None else (normed, residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
