"""Tiny model stand-ins of the model families the configs ship, built with torchtune's own component builders.

Each family is its torchtune builder with tiny dimensions (Qwen2.5 keeps its QKV bias and tied embeddings, Gemma 2 its
soft-capping and sliding window, Phi-3/Phi-4 their fused HF projections; Qwen3 is :mod:`dpo_components.models.qwen3`,
with its q/k norms and ``head_dim`` wider than ``embed_dim / num_heads`` as in Qwen3-0.6B), its own tokenizer class on
tiny files (:mod:`dpo_components.tiny.family_tokenizers`), and a checkpoint in the family's
Hugging Face layout that torchtune's ``FullModelHFCheckpointer`` (with the family's ``model_type``) and
``transformers`` (``AutoModelForCausalLM``) both load. A shipped config runs on it with only sizes and files
swapped:

    model:        _component_: dpo_components.tiny.families.lora_tiny_model   family: qwen2_5   (LoRA args as shipped)
    tokenizer:    the shipped builder, with the paths of write_tiny_checkpoint's tokenizer files
    checkpointer: the shipped model_type, checkpoint_dir: the tiny checkpoint

    python -m dpo_components.tiny.families OUT_DIR   # writes OUT_DIR/<family>/ for every family
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.gemma2._component_builders import gemma2, lora_gemma2
from torchtune.models.gemma2._convert_weights import gemma2_tune_to_hf
from torchtune.models.mistral._component_builders import lora_mistral, mistral
from torchtune.models.phi3._component_builders import lora_phi3, phi3
from torchtune.models.phi3._convert_weights import phi3_tune_to_hf
from torchtune.models.qwen2._component_builders import lora_qwen2, qwen2
from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf
from torchtune.modules import RMSNorm, TransformerDecoder
from torchtune.training import FullModelHFCheckpointer

from dpo_components.models.gemma2 import cap_logits_like_gemma2
from dpo_components.models.qwen3 import Qwen3HFCheckpointer, lora_qwen3, qwen3, qwen3_tune_to_hf
from dpo_components.tiny.family_tokenizers import write_family_tokenizer
from dpo_components.tiny.hf_tokenizers import HF_FAMILIES, write_hf_tokenizer

# Per family: torchtune builders, tiny builder arguments (every weight a multiple of 16384 elements, as NF4 (QLoRA)
# needs; vocab >= the tiny tokenizer's), the state-dict conversion to HF names and the HF config's own keys.
FAMILIES: dict[str, dict[str, Any]] = {
    "qwen2_5": dict(
        builder=qwen2, lora_builder=lora_qwen2, model_type="QWEN2",
        args=dict(vocab_size=640, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=512,
                  max_seq_len=512, norm_eps=1e-6, rope_base=1_000_000.0, tie_word_embeddings=True),
        to_hf=partial(qwen2_tune_to_hf, tie_word_embeddings=True),
        hf=dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
                tie_word_embeddings=True, bos_token="<|endoftext|>", eos_token="<|im_end|>"),
    ),
    "mistral": dict(
        builder=mistral, lora_builder=lora_mistral, model_type="MISTRAL",
        args=dict(vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=512,
                  max_seq_len=512, norm_eps=1e-5, rope_base=1_000_000),
        to_hf=tune_to_hf,
        hf=dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    ),
    "gemma2": dict(  # soft-capping, and a sliding window shorter than the test sequences
        builder=lambda **args: cap_logits_like_gemma2(gemma2(**args)),  # as dpo_components.models.gemma2
        lora_builder=lambda **args: cap_logits_like_gemma2(lora_gemma2(**args)),
        model_type="GEMMA2", tokenizer="gemma",
        args=dict(vocab_size=512, num_layers=2, num_heads=4, head_dim=64, num_kv_heads=2, embed_dim=256,
                  intermediate_dim=512, max_seq_len=512, norm_eps=1e-6, rope_base=10_000, hidden_capping_value=50.0,
                  final_capping_value=30.0, sliding_window_size=16),
        to_hf=partial(gemma2_tune_to_hf, head_dim=64),
        hf=dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", hidden_activation="gelu_pytorch_tanh",
                query_pre_attn_scalar=64, sliding_window=16, attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                bos_token_id=2),
    ),
    "qwen3": dict(  # head_dim 128 > 256 / 4, as Qwen3-0.6B's 128 > 1024 / 16; tied, as 0.6B-4B
        builder=qwen3, lora_builder=lora_qwen3, model_type="QWEN3",
        args=dict(vocab_size=640, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=512,
                  head_dim=128, max_seq_len=512, norm_eps=1e-6, rope_base=1_000_000.0, tie_word_embeddings=True),
        to_hf=partial(qwen3_tune_to_hf, tie_word_embeddings=True),
        hf=dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False, use_sliding_window=False,
                sliding_window=None, tie_word_embeddings=True, bos_token="<|endoftext|>", eos_token="<|im_end|>"),
    ),
    "phi3": dict(  # Phi-3-mini: multi-head attention (kv heads = heads), SentencePiece vocabulary
        builder=phi3, lora_builder=lora_phi3, model_type="PHI3_MINI",
        args=dict(vocab_size=640, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=256, intermediate_dim=512,
                  max_seq_len=512, norm_eps=1e-5, rope_base=10_000),
        to_hf=lambda state, **_: phi3_tune_to_hf(state),  # fused qkv_proj and gate_up_proj
        hf=dict(architectures=["Phi3ForCausalLM"], model_type="phi3", tie_word_embeddings=False, bos_token_id=1,
                eos_token="<|endoftext|>", pad_token="<|endoftext|>", original_max_position_embeddings=512,
                rope_scaling=None),
    ),
    "phi4": dict(  # Phi-4: Phi-3's architecture with grouped-query attention and a byte-level BPE vocabulary
        builder=phi3, lora_builder=lora_phi3, model_type="PHI4",
        args=dict(vocab_size=768, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=512,
                  max_seq_len=512, norm_eps=1e-5, rope_base=250_000),
        to_hf=lambda state, **_: phi3_tune_to_hf(state),
        hf=dict(architectures=["Phi3ForCausalLM"], model_type="phi3", tie_word_embeddings=False,
                bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|dummy_85|>",
                original_max_position_embeddings=512, rope_scaling=None),
    ),
}  # fmt: skip


def tiny_model(family: str) -> TransformerDecoder:
    """``family``'s tiny model with fresh weights (embeddings at N(0, 0.02), as Hugging Face initialises them)."""
    model = FAMILIES[family]["builder"](**FAMILIES[family]["args"])
    nn.init.normal_(model.tok_embeddings.weight, mean=0.0, std=0.02)
    for module in model.modules():  # norm scales away from 1, so a norm in the wrong place (Qwen3's q/k norms
        if isinstance(module, RMSNorm):  # go before RoPE: a rotation commutes with a unit-scale RMSNorm) shows
            nn.init.uniform_(module.scale, 0.5, 1.5)
    return model


def hf_checkpointer(family: str, checkpoint_dir: str | Path, checkpoint_files: list[str],
                    output_dir: str | Path) -> FullModelHFCheckpointer:  # fmt: skip
    """The HF checkpointer a config of ``family`` names (Qwen3: ``models.qwen3.Qwen3HFCheckpointer``)."""
    checkpointer = Qwen3HFCheckpointer if family == "qwen3" else FullModelHFCheckpointer
    return checkpointer(checkpoint_dir=str(checkpoint_dir), checkpoint_files=checkpoint_files,
                        output_dir=str(output_dir), model_type=FAMILIES[family]["model_type"])  # fmt: skip


def lora_tiny_model(
    family: str,
    lora_attn_modules: list[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """``family``'s tiny model with LoRA/DoRA adapters (its torchtune ``lora_*`` builder), NF4 base with
    ``quantize_base``."""
    output = {"apply_lora_to_output": apply_lora_to_output} if apply_lora_to_output else {}  # Gemma: tied, none
    return FAMILIES[family]["lora_builder"](
        lora_attn_modules=lora_attn_modules, apply_lora_to_mlp=apply_lora_to_mlp, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_dora=use_dora, quantize_base=quantize_base,
        **output, **FAMILIES[family]["args"],
    )  # fmt: skip


def hf_config(family: str, special_tokens: dict[str, int]) -> dict[str, Any]:
    """``config.json`` in the family's transformers schema."""
    args, hf = FAMILIES[family]["args"], dict(FAMILIES[family]["hf"])
    for key in ("bos_token", "eos_token", "pad_token"):  # named special tokens -> their ids in the tiny vocabulary
        if key in hf:
            hf[f"{key}_id"] = special_tokens[hf.pop(key)]
    return {
        "vocab_size": args["vocab_size"], "hidden_size": args["embed_dim"],
        "intermediate_size": args["intermediate_dim"], "num_hidden_layers": args["num_layers"],
        "num_attention_heads": args["num_heads"], "num_key_value_heads": args["num_kv_heads"],
        "head_dim": args.get("head_dim", args["embed_dim"] // args["num_heads"]),
        "max_position_embeddings": args["max_seq_len"],
        "rms_norm_eps": args["norm_eps"], "rope_theta": float(args["rope_base"]), "hidden_act": "silu",
        "torch_dtype": "float32", **hf,
    }  # fmt: skip


def write_tiny_checkpoint(out_dir: str | Path, family: str, seed: int = 0) -> Path:
    """The family's tokenizer files (torchtune's and Hugging Face's, with its chat template), ``config.json`` and
    ``model.safetensors`` (random weights from ``seed``)."""
    tokenizer_family = FAMILIES[family].get("tokenizer", family)
    out = write_family_tokenizer(out_dir, tokenizer_family)
    if tokenizer_family in HF_FAMILIES:  # tokenizer_config.json (+ tokenizer.json): AutoTokenizer loads it
        write_hf_tokenizer(out, tokenizer_family)
    special_file = out / "special_tokens.json"
    added = json.loads(special_file.read_text())["added_tokens"] if special_file.exists() else []
    torch.manual_seed(seed)
    args = FAMILIES[family]["args"]
    state = FAMILIES[family]["to_hf"](tiny_model(family).state_dict(), num_heads=args["num_heads"],
                                      num_kv_heads=args["num_kv_heads"], dim=args["embed_dim"])  # fmt: skip
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config = hf_config(family, {token["content"]: token["id"] for token in added})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    for family in FAMILIES:
        print(write_tiny_checkpoint(Path(parser.parse_args().out_dir) / family, family))


if __name__ == "__main__":
    main()
