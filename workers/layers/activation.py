"""SwiGLU: the MLP's fused gate/up projection output goes in, silu(gate) * up comes out."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)  # [num_tokens, intermediate] each
        return F.silu(gate) * up  # [num_tokens, intermediate]
