"""SwiGLU: the MLP's fused gate/up projection output goes in, silu(gate) * up comes out."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.kernels import cpu as cpu_kernels


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.enabled(gate_up) and gate_up.is_contiguous():
            return cpu_kernels.silu_and_mul(gate_up)  # [num_tokens, intermediate]
        gate, up = gate_up.chunk(2, dim=-1)  # [num_tokens, intermediate] each
        return F.silu(gate) * up  # [num_tokens, intermediate]
