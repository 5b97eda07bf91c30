"""RMSNorm with an optional fused residual add (the pre-norm transformer pattern)."""
from __future__ import annotations

import torch
from torch import nn

from workers.kernels import cpu as cpu_kernels


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
        residual stream; the fused CPU kernel computes both in place, in x's and residual's storage, so callers
        must not read either afterwards."""
        if cpu_kernels.enabled(x, self.weight):
            if residual is None:
                return cpu_kernels.rms_norm(x, self.weight, self.eps)
            if x.is_contiguous() and residual.is_contiguous():
                cpu_kernels.fused_add_rms_norm_(x, residual, self.weight, self.eps)
                return x, residual
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
