"""A tiny Llama-3.2-Vision model (torchtune's own component builders, sizes shrunk) for the vision tests and the
tiny vision task: a CLIP encoder on 56-pixel tiles (16 patches + CLS = 17 tokens a tile, up to 2 tiles) feeding a
2-layer decoder through a cross-attention layer at every layer. About 0.9 M parameters; everything a recipe does
with the 11B model (LoRA on encoder, fusion and decoder layers, the HF checkpointer's ``LLAMA3_VISION`` conversion)
runs on it unchanged.

torchtune starts every cross-attention gate (``TanhGate.scale``) at 0, so a random model's text ignores its
images; ``gate_init`` sets them (tests of the image path use 1.0; a real start is a trained checkpoint).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchtune.modules.model_fusion import DeepFusionModel
from torchtune.modules.tanh_gate import TanhGate

from dpo_components.models.llama3_2_vision import (
    llama3_2_vision_decoder,
    llama3_2_vision_encoder,
    lora_llama3_2_vision_decoder,
    lora_llama3_2_vision_encoder,
)

TINY_VISION_ENCODER_ARGS: dict[str, Any] = dict(
    patch_size=14, tile_size=56, max_num_tiles=2, clip_embed_dim=64, num_heads=2, clip_num_layers=2,
    clip_hidden_states=[0, 1], num_layers_projection=1, decoder_embed_dim=128, in_channels=3,
)  # fmt: skip
# vocab 576 >= the tiny tokenizer's ids (its <|image|> is an ordinary token here; the 8 fusion ids follow the vocab)
TINY_VISION_DECODER_ARGS: dict[str, Any] = dict(
    vocab_size=576, num_layers=2, fusion_interval=1, num_special_tokens=8, num_heads=4, num_kv_heads=2,
    embed_dim=128, max_seq_len=512, encoder_max_seq_len=4 * 2 * 17, rope_base=500_000, intermediate_dim=256,
)  # fmt: skip


def _initialised(model: DeepFusionModel, gate_init: float) -> DeepFusionModel:
    nn.init.normal_(model.decoder.tok_embeddings.embedding.weight, mean=0.0, std=0.02)
    nn.init.normal_(model.decoder.tok_embeddings.fusion_embedding.weight, mean=0.0, std=0.02)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TanhGate):
                module.scale.fill_(gate_init)
    return model


def tiny_llama_vision(gate_init: float = 0.0) -> DeepFusionModel:
    """The tiny vision model, every parameter trainable; cross-attention gates at ``gate_init``."""
    model = DeepFusionModel(
        encoder=llama3_2_vision_encoder(**TINY_VISION_ENCODER_ARGS),
        decoder=llama3_2_vision_decoder(**TINY_VISION_DECODER_ARGS),
        encoder_trainable=True, decoder_trainable=True, fusion_trainable=True,
    )  # fmt: skip
    return _initialised(model, gate_init)


def lora_tiny_llama_vision(
    lora_attn_modules: list[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    encoder_lora: bool = True,
    decoder_lora: bool = True,
    fusion_lora: bool = True,
    gate_init: float = 0.0,
) -> DeepFusionModel:
    """The tiny vision model with LoRA (DoRA, QLoRA) adapters on the encoder, the decoder's self-attention layers
    and the fusion (cross-attention, projection) layers, each switchable as torchtune's ``lora_llama3_2_vision_11b``
    does with ``encoder_trainable`` / ``decoder_trainable`` / ``fusion_trainable``. Base weights come from a
    checkpoint; ``gate_init`` only matters for a model used without one."""
    lora = dict(lora_attn_modules=lora_attn_modules, apply_lora_to_mlp=apply_lora_to_mlp,
                apply_lora_to_output=apply_lora_to_output, lora_rank=lora_rank, lora_alpha=lora_alpha,
                lora_dropout=lora_dropout, use_dora=use_dora, quantize_base=quantize_base)  # fmt: skip
    model = DeepFusionModel(
        encoder=lora_llama3_2_vision_encoder(encoder_lora=encoder_lora, fusion_lora=fusion_lora, **lora,
                                             **TINY_VISION_ENCODER_ARGS),
        decoder=lora_llama3_2_vision_decoder(decoder_lora=decoder_lora, fusion_lora=fusion_lora, **lora,
                                             **TINY_VISION_DECODER_ARGS),
        encoder_trainable=True, decoder_trainable=True, fusion_trainable=True,
    )  # fmt: skip
    return _initialised(model, gate_init)
