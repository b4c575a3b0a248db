"""Low-precision and quantized training from YAML, on torchao <= 0.15 (the newest torchtune 0.6.1 imports).

Module paths used (torchao 0.15):
- NF4 / QLoRA: ``torchao.dtypes.nf4tensor`` through torchtune's ``quantize_base: true`` (moved in torchao 0.18);
- low-bit optimizers: ``torchao.optim.{AdamW8bit, AdamW4bit, AdamWFp8, CPUOffloadOptimizer}``;
- int8 training: ``torchao.prototype.quantized_training.{int8_mixed_precision_training,
  int8_weight_only_quantized_training}`` applied with ``torchao.quantization.quantize_``;
- float8 training: ``torchao.float8.convert_to_float8_training`` (needs an SM89+ GPU: Ada, Hopper or newer).

The ``model_transform`` functions take the full-parameter policy after its weights are loaded and return it; the recipes
call them as ``model_transform: {_component_: dpo_components.models.quantization.int8_mixed_precision}``. Only the
linear layers inside the transformer blocks are converted: embeddings and the (often tied) output projection stay in the
training dtype. ``plain_state_dict`` turns the training subclasses back into ordinary tensors for saving.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpo_components.settings import ConfigError


def _transformer_linears(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.startswith("layers.")


def int8_mixed_precision(model: nn.Module) -> nn.Module:
    """torchao's INT8 mixed-precision training: weights stay in high precision, matmuls run in int8.

    The linears are swapped for torchao's ``Int8MixedPrecisionTrainingLinear`` (sharing the same parameters)
    rather than converted with ``quantize_(model, int8_mixed_precision_training())``: on torch 2.13 with torchao
    0.15 the weight subclass that ``quantize_`` installs never reaches its ``F.linear`` override, so the matmuls
    silently stay in full precision (outputs bit-identical to fp32; tests/components/test_quantization.py checks
    ours differ).
    """
    from torchao.prototype.quantized_training.int8_mixed_precision import (
        Int8MixedPrecisionTrainingConfig,
        Int8MixedPrecisionTrainingLinear,
    )

    config = Int8MixedPrecisionTrainingConfig()
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            fqn = f"{parent_name}.{name}" if parent_name else name
            if type(child) is nn.Linear and _transformer_linears(child, fqn):
                swapped = Int8MixedPrecisionTrainingLinear(
                    child.in_features, child.out_features, bias=child.bias is not None, config=config, device="meta"
                )
                swapped.weight, swapped.bias = child.weight, child.bias
                setattr(parent, name, swapped)
    return model


def int8_weight_only(model: nn.Module) -> nn.Module:
    """torchao's INT8 weight-only quantized training: the weights themselves are stored in int8 (stochastic
    rounding on update), which saves weight memory at some cost in accuracy and speed."""
    from torchao.prototype.quantized_training import int8_weight_only_quantized_training
    from torchao.quantization import quantize_

    quantize_(model, int8_weight_only_quantized_training(), filter_fn=_transformer_linears)
    return model


def float8(model: nn.Module) -> nn.Module:
    """torchao's float8 training (tensorwise scaling) of the transformer linears; refuses a device without it."""
    ok, reason = requirement_met("sm89")
    if not ok:
        raise ConfigError(f"float8 training is not available: {reason}")
    from torchao.float8 import convert_to_float8_training

    convert_to_float8_training(model, module_filter_fn=lambda module, fqn: _transformer_linears(module, fqn))
    return model


def cpu_offload_adamw(params: Any, lr: float = 1e-5, offload_gradients: bool = False, **kwargs: Any):
    """AdamW whose states (and optionally gradients) live in CPU memory: torchao's ``CPUOffloadOptimizer``, which
    takes the optimizer *class*, so YAML names this function instead. CUDA (or XPU) only."""
    ok, reason = requirement_met("cuda")
    if not ok:
        raise ConfigError(f"CPU-offloaded optimizer states are not available: {reason}")
    from torchao.optim import CPUOffloadOptimizer

    return CPUOffloadOptimizer(params, torch.optim.AdamW, offload_gradients=offload_gradients, lr=lr, **kwargs)


def requirement_met(requires: str | None) -> tuple[bool, str]:
    """(True, "") if this machine has what a variant needs: None, "cuda" or "sm89"; else (False, why not)."""
    if requires is None:
        return True, ""
    if not torch.cuda.is_available():
        return False, f"needs a CUDA GPU ({'SM89+, ' if requires == 'sm89' else ''}none here)"
    if requires == "sm89" and torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        return False, f"needs compute capability 8.9+ (Ada/Hopper), this GPU is {major}.{minor}"
    return True, ""


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as ordinary CPU tensors (torchao training subclasses dequantized), for saving."""
    out = {}
    for key, value in model.state_dict().items():
        if type(value) is not torch.Tensor and hasattr(value, "dequantize"):
            value = value.dequantize()
        out[key] = value.detach().cpu().clone()
    return out


NF4_PARAMS_PER_SECOND_CPU = 8e6  # torchao's to_nf4 on one core of the 2-core test machine (bf16 2048 x 8192)


def nf4_estimate(base_state: dict[str, torch.Tensor], device: torch.device) -> str:
    """How long QLoRA's NF4 quantization of ``base_state``'s linear weights will take, in words, for a log line:
    torchtune quantizes each twice (at build and at load); about 8M parameters per second on one CPU core."""
    unquantized = ("tok_embeddings.weight", "output.weight")
    params = sum(v.numel() for k, v in base_state.items() if v.dim() == 2 and k not in unquantized)
    if device.type != "cpu":
        return f"({params / 1e9:.1f}B parameters, twice: seconds on a GPU)"
    seconds = 2 * params / NF4_PARAMS_PER_SECOND_CPU
    return f"({params / 1e9:.2f}B parameters, twice: about {seconds:.0f} s on one CPU core)"
