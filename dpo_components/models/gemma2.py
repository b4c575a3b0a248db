"""Gemma 2 builders that soft-cap the logits: torchtune 0.6.1's Gemma 2 applies ``final_capping_value`` to the
normalised hidden states (``Gemma2FinalNorm``) instead of to the logits as Gemma 2 (and ``transformers``) does,
so its log-probs differ from the released model's; ``gemma2_2b``/``gemma2_9b`` and their ``lora_`` versions
here are torchtune's with that fixed (:func:`cap_logits_like_gemma2`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchtune.models import gemma2 as tt_gemma2
from torchtune.modules import TransformerDecoder


class _SoftCappedLogits(nn.Module):
    """``cap * tanh(output(h) / cap)``: Gemma 2's final logit soft-capping around the output projection."""

    def __init__(self, output: Any, cap: float) -> None:
        super().__init__()
        self.output, self.cap = output, cap  # a TiedLinear is not a module: no parameters are added here

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.output(hidden) / self.cap) * self.cap


def cap_logits_like_gemma2(model: TransformerDecoder) -> TransformerDecoder:
    """Move torchtune's Gemma 2 final soft-capping from the normalised hidden states to the logits (state-dict keys
    unchanged, so checkpoints load as before)."""
    model.norm.logit_capping = nn.Identity()
    model.output = _SoftCappedLogits(model.output, model.norm.capping_value)
    return model


def gemma2_2b() -> TransformerDecoder:
    """Gemma 2 2B (base or -it) with logit soft-capping as released."""
    return cap_logits_like_gemma2(tt_gemma2.gemma2_2b())


def gemma2_9b() -> TransformerDecoder:
    """Gemma 2 9B (base or -it) with logit soft-capping as released."""
    return cap_logits_like_gemma2(tt_gemma2.gemma2_9b())


def lora_gemma2_2b(lora_attn_modules: list[str], apply_lora_to_mlp: bool = False, lora_rank: int = 8,
                   lora_alpha: float = 16, lora_dropout: float = 0.0, use_dora: bool = False,
                   quantize_base: bool = False) -> TransformerDecoder:  # fmt: skip
    """Gemma 2 2B with LoRA/DoRA adapters (QLoRA with ``quantize_base``), logit soft-capping as released."""
    return cap_logits_like_gemma2(tt_gemma2.lora_gemma2_2b(
        lora_attn_modules, apply_lora_to_mlp, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        use_dora=use_dora, quantize_base=quantize_base))  # fmt: skip


def lora_gemma2_9b(lora_attn_modules: list[str], apply_lora_to_mlp: bool = False, lora_rank: int = 8,
                   lora_alpha: float = 16, lora_dropout: float = 0.0, use_dora: bool = False,
                   quantize_base: bool = False) -> TransformerDecoder:  # fmt: skip
    """Gemma 2 9B with LoRA/DoRA adapters (QLoRA with ``quantize_base``), logit soft-capping as released."""
    return cap_logits_like_gemma2(tt_gemma2.lora_gemma2_9b(
        lora_attn_modules, apply_lora_to_mlp, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        use_dora=use_dora, quantize_base=quantize_base))  # fmt: skip
