"""RMSNorm with its scale in the input's compute dtype, so PyTorch's fused kernel runs.

torchtune 0.6.1's ``RMSNorm.forward`` normalises ``x.float()`` with ``F.rms_norm(..., weight=self.scale)``; with a
bf16 scale (every bf16 run, and FSDP2's bf16 compute over fp32 shards) PyTorch warns on every forward
("Mismatch dtype between input and weight ... Cannot dispatch to fused implementation") and takes the unfused path.
:func:`fused_rms_norm` gives each ``RMSNorm`` the same computation with the scale cast to fp32 (exact for a bf16
scale), which the fused kernel accepts. A model already in fp32 computes exactly as before.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules import RMSNorm


def _rms_norm_forward(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x.float(), self.normalized_shape, weight=self.scale.float(), eps=self.eps).to(x.dtype)


def fused_rms_norm(model: nn.Module) -> nn.Module:
    """Give every torchtune ``RMSNorm`` of ``model`` the forward above, in place (the recipes call it)."""
    for module in model.modules():
        if type(module) is RMSNorm:
            module.forward = types.MethodType(_rms_norm_forward, module)
    return model
