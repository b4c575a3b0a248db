"""A tiny Llama-3.2-Vision model (torchtune's own component builders, sizes shrunk) for the vision tests and the
tiny vision task: a CLIP encoder on 56-pixel tiles (16 patches + CLS = 17 tokens a tile, up to 2 tiles) feeding a
2-layer decoder through a cross-attention layer at every layer. About 3.4 M parameters; everything a recipe does
with the 11B model (LoRA on encoder, fusion and decoder layers, the HF checkpointer's ``LLAMA3_VISION`` conversion)
runs on it unchanged.

torchtune starts every cross-attention gate (``TanhGate.scale``) at 0, so a random model's text ignores its
images; ``gate_init`` sets them (tests of the image path use 1.0; a real start is a trained checkpoint).
"""

from __future__ import annotations

from pathlib import Path
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
from dpo_components.tiny.model import _special_token_ids, write_hf_dir
from dpo_components.tiny.tokenizer import ASSET_DIR as TOKENIZER_DIR

TINY_VISION_ENCODER_ARGS: dict[str, Any] = dict(
    patch_size=14, tile_size=56, max_num_tiles=2, clip_embed_dim=128, num_heads=2, clip_num_layers=2,
    clip_hidden_states=[0, 1], num_layers_projection=1, decoder_embed_dim=256, in_channels=3,
)  # fmt: skip
# vocab 576 >= the tiny tokenizer's ids (its <|image|> is an ordinary token here; the 8 fusion ids follow the vocab).
# Every linear layer holds a multiple of 64 x 256 weights, so NF4 (QLoRA) quantises each of them.
TINY_VISION_DECODER_ARGS: dict[str, Any] = dict(
    vocab_size=576, num_layers=2, fusion_interval=1, num_special_tokens=8, num_heads=4, num_kv_heads=2,
    embed_dim=256, max_seq_len=512, encoder_max_seq_len=4 * 2 * 17, rope_base=500_000, intermediate_dim=512,
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


def hf_vision_config(
    encoder_args: dict[str, Any] | None = None,
    decoder_args: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer_dir: str | Path = TOKENIZER_DIR,
) -> dict[str, Any]:
    """``config.json`` in transformers' ``MllamaForConditionalGeneration`` schema for a model built from torchtune's
    ``llama3_2_vision_encoder`` / ``_decoder`` arguments (default: the tiny model's). HF numbers the decoder's
    cross-attention layers among its self-attention layers: torchtune's fused layer j (0-based, fused when
    ``(j + 1) % fusion_interval == 0``) runs its cross-attention first, at HF index j + (fused layers before j)."""
    enc, dec = encoder_args or TINY_VISION_ENCODER_ARGS, decoder_args or TINY_VISION_DECODER_ARGS
    from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

    special = _special_token_ids(tokenizer_dir)
    fused = [j for j in range(dec["num_layers"]) if (j + 1) % dec["fusion_interval"] == 0]
    cross = [j + k for k, j in enumerate(fused)]
    max_tiles = enc["max_num_tiles"]
    ratios = [list(r) for r in get_all_supported_aspect_ratios(max_tiles)]  # ids 1.. of the processor, in order
    return {
        "architectures": ["MllamaForConditionalGeneration"],
        "model_type": "mllama",
        "image_token_index": special["<|image|>"],
        "torch_dtype": str(dtype).removeprefix("torch."),
        "text_config": {
            "model_type": "mllama_text_model",
            "vocab_size": dec["vocab_size"],
            "hidden_size": dec["embed_dim"],
            "intermediate_size": dec["intermediate_dim"],
            "num_hidden_layers": dec["num_layers"] + len(cross),
            "num_attention_heads": dec["num_heads"],
            "num_key_value_heads": dec["num_kv_heads"],
            "cross_attention_layers": cross,
            "max_position_embeddings": dec["max_seq_len"],
            "rms_norm_eps": 1e-5,
            "rope_theta": float(dec["rope_base"]),
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192},  # torchtune's Llama3ScaledRoPE defaults
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": special["<|begin_of_text|>"],
            "eos_token_id": [special["<|end_of_text|>"], special["<|eot_id|>"]],
            "pad_token_id": special["<|finetune_right_pad_id|>"],
        },
        "vision_config": {
            "model_type": "mllama_vision_model",
            "hidden_size": enc["clip_embed_dim"],
            "intermediate_size": 4 * enc["clip_embed_dim"],
            "num_hidden_layers": enc["clip_num_layers"],
            "num_global_layers": enc["num_layers_projection"],
            "attention_heads": enc["num_heads"],
            "num_channels": enc["in_channels"],
            "image_size": enc["tile_size"],
            "patch_size": enc["patch_size"],
            "max_num_tiles": max_tiles,
            "intermediate_layers_indices": list(enc["clip_hidden_states"]),
            "vision_output_dim": enc["clip_embed_dim"] * (len(enc["clip_hidden_states"]) + 1),
            "supported_aspect_ratios": ratios,
            "norm_eps": 1e-5,
        },
    }


def save_hf_vision_checkpoint(model: nn.Module, out_dir: str | Path, tokenizer_dir: str | Path = TOKENIZER_DIR) -> Path:
    """Save a (non-LoRA) tiny vision model as ``config.json`` + ``model.safetensors`` + tokenizer files in
    transformers' Mllama layout (what torchtune's ``FullModelHFCheckpointer(model_type="LLAMA3_VISION")`` reads);
    written under a temporary name and renamed into place."""
    from torchtune.models.llama3_2_vision._convert_weights import llama3_vision_tune_to_hf

    state = dict(model.state_dict())
    config = hf_vision_config(dtype=next(iter(state.values())).dtype, tokenizer_dir=tokenizer_dir)
    text, vision = config["text_config"], config["vision_config"]
    hf_state = llama3_vision_tune_to_hf(
        state, num_heads=text["num_attention_heads"], num_kv_heads=text["num_key_value_heads"],
        dim=text["hidden_size"], vocab_size=text["vocab_size"], cross_attention_layers=text["cross_attention_layers"],
        encoder_dim=vision["hidden_size"], tile_size=vision["image_size"], num_tiles=vision["max_num_tiles"],
        supported_aspect_ratios=vision["supported_aspect_ratios"],
    )  # fmt: skip
    return write_hf_dir(out_dir, hf_state, config, tokenizer_dir)
