"""DoRA on layers with a bias (Qwen2/2.5's q/k/v): torchtune's ``DoRALinear`` scales the bias with the magnitude,
while DoRA (and PEFT, and the merged weights every checkpoint exports) leaves it out:
``y = m (W + s BA) x / ||W + s BA|| + b``. Trained that way, the exported model computed something else (logits
0.12 off on the tiny Qwen2.5). :func:`unscale_dora_bias` gives such layers DoRA's forward; the recipes call it.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torchao.dtypes.nf4tensor import linear_nf4
from torchtune.modules.peft import DoRALinear


def _dora_forward_with_plain_bias(self: DoRALinear, x: torch.Tensor) -> torch.Tensor:
    """torchtune 0.6.1's ``DoRALinear.forward`` with the bias added after the magnitude scaling, not scaled by it."""
    base_out = linear_nf4(input=x, weight=self.weight) if self._quantize_base else F.linear(x, self.weight)
    if not self.disabled:
        lora_out = self.lora_b(self.lora_a(self.dropout(x)))
        x_eye = torch.eye(self.lora_a.weight.shape[1], device=self.lora_a.weight.device, dtype=x.dtype)
        lora_weight = self.lora_b(self.lora_a(x_eye)).T  # through the modules, so FSDP's hooks run
        weight_norm = self._get_weight_norm(self.weight.to(x.dtype), lora_weight.detach()).detach()
        scale = (self.magnitude / weight_norm).view(1, -1)
        base_out = scale * base_out + scale * lora_out * self.scaling
    return base_out + self.bias


def unscale_dora_bias(model: nn.Module) -> nn.Module:
    """Give every ``DoRALinear`` with a bias DoRA's own forward (bias outside the magnitude scaling), in place."""
    for module in model.modules():
        if isinstance(module, DoRALinear) and module.use_bias:
            module.forward = types.MethodType(_dora_forward_with_plain_bias, module)
    return model
