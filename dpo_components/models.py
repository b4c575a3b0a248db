"""Model pieces torchtune 0.6.1 lacks or gets wrong, made from torchtune's own components (YAML: ``_component_``).
Tokenizers and chat formats: :mod:`dpo_components.chat_formats`; Qwen3: :mod:`dpo_components.qwen3`.

- Gemma 2 builders that soft-cap the logits: torchtune 0.6.1's Gemma 2 applies ``final_capping_value`` to the
  normalised hidden states (``Gemma2FinalNorm``) instead of to the logits as Gemma 2 (and ``transformers``) does,
  so its log-probs differ from the released model's; ``gemma2_2b``/``gemma2_9b`` and their ``lora_`` versions
  here are torchtune's with that fixed (:func:`cap_logits_like_gemma2`).
- Phi-4 14B: torchtune's ``phi4_14b`` keeps Phi-3's RoPE base of 10,000; Phi-4 was trained with 250,000 (its
  ``config.json``: ``rope_theta``; the technical report's context extension to 16k), so torchtune's Phi-4 computes
  other log-probs than the released model from the same weights. ``phi4_14b``/``lora_phi4_14b`` here use 250,000.
- DoRA on layers with a bias (Qwen2/2.5's q/k/v): torchtune's ``DoRALinear`` scales the bias with the magnitude,
  while DoRA (and PEFT, and the merged weights every checkpoint exports) leaves it out:
  ``y = m (W + s BA) x / ||W + s BA|| + b``. Trained that way, the exported model computed something else (logits
  0.12 off on the tiny Qwen2.5). :func:`unscale_dora_bias` gives such layers DoRA's forward; the recipes call it.
- Mistral 7B v0.3 (and its Instruct): torchtune's ``mistral_7b`` is v0.1 (vocabulary 32,000, RoPE base 10,000);
  v0.3 has a 32,768-token vocabulary, RoPE base 1e6 and a 32k context, so its weights do not load into v0.1's
  builder. Same architecture otherwise (``model_type: MISTRAL`` in the HF checkpointer).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchao.dtypes.nf4tensor import linear_nf4
from torchtune.models import gemma2 as tt_gemma2
from torchtune.models.mistral._component_builders import lora_mistral, mistral
from torchtune.models.phi3._component_builders import lora_phi3, phi3
from torchtune.modules import TransformerDecoder
from torchtune.modules.peft import DoRALinear

# Mistral-7B(-Instruct)-v0.3's config.json
MISTRAL_7B_V0_3 = dict(vocab_size=32_768, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096,
                       intermediate_dim=14_336, max_seq_len=32_768, norm_eps=1e-5, rope_base=1_000_000)  # fmt: skip


def mistral_7b_v0_3() -> TransformerDecoder:
    """Mistral 7B v0.3 (base or Instruct)."""
    return mistral(**MISTRAL_7B_V0_3)


def lora_mistral_7b_v0_3(
    lora_attn_modules: list[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """Mistral 7B v0.3 with LoRA/DoRA adapters; ``quantize_base`` keeps the base weights in NF4 (QLoRA)."""
    return lora_mistral(
        lora_attn_modules=lora_attn_modules, apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, use_dora=use_dora, quantize_base=quantize_base, **MISTRAL_7B_V0_3,
    )  # fmt: skip


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


# microsoft/phi-4's config.json
PHI4_14B = dict(vocab_size=100_352, num_layers=40, num_heads=40, num_kv_heads=10, embed_dim=5120,
                intermediate_dim=17_920, max_seq_len=16_384, norm_eps=1e-5, rope_base=250_000)  # fmt: skip


def phi4_14b() -> TransformerDecoder:
    """Phi-4 14B with its released RoPE base (250,000)."""
    return phi3(**PHI4_14B)


def lora_phi4_14b(
    lora_attn_modules: list[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """Phi-4 14B with LoRA/DoRA adapters (QLoRA with ``quantize_base``), RoPE base 250,000 as released."""
    return lora_phi3(
        lora_attn_modules=lora_attn_modules, apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, use_dora=use_dora, quantize_base=quantize_base, **PHI4_14B,
    )  # fmt: skip


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
