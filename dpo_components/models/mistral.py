"""Mistral 7B v0.3 (and its Instruct): torchtune's ``mistral_7b`` is v0.1 (vocabulary 32,000, RoPE base 10,000);
v0.3 has a 32,768-token vocabulary, RoPE base 1e6 and a 32k context, so its weights do not load into v0.1's
builder. Same architecture otherwise (``model_type: MISTRAL`` in the HF checkpointer).
"""

from __future__ import annotations

from torchtune.models.mistral._component_builders import lora_mistral, mistral
from torchtune.modules import TransformerDecoder

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
