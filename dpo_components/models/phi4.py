"""Phi-4 14B: torchtune's ``phi4_14b`` keeps Phi-3's RoPE base of 10,000; Phi-4 was trained with 250,000 (its
``config.json``: ``rope_theta``; the technical report's context extension to 16k), so torchtune's Phi-4 computes
other log-probs than the released model from the same weights. ``phi4_14b``/``lora_phi4_14b`` here use 250,000.
"""

from __future__ import annotations

from torchtune.models.phi3._component_builders import lora_phi3, phi3
from torchtune.modules import TransformerDecoder

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
