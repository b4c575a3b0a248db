"""A tiny Llama-3.2-architecture model for the demo and the tests, saved in Hugging Face layout.

The model is built with torchtune's own component builders (``llama3_2`` / ``lora_llama3_2``), so everything a
recipe does with a real Llama (LoRA, QLoRA/NF4, FSDP, the HF checkpointer) runs on it unchanged. torchtune's
builders leave ``nn.Embedding`` at N(0, 1), which with tied output weights gives an initial loss of ~250 nats per
token; ``tiny_llama`` re-initialises it to N(0, 0.02) like Hugging Face's Llama.

``save_hf_checkpoint`` writes ``config.json`` + ``model.safetensors`` (+ the tokenizer files) that torchtune's
``FullModelHFCheckpointer(model_type="LLAMA3_2")`` and ``transformers.LlamaForCausalLM`` both load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
from torchtune.modules import TransformerDecoder

from dpo_components.tiny.tokenizer import ASSET_DIR as TOKENIZER_DIR
from dpo_components.tiny.tokenizer import TOKENIZER_FILES

# 4 layers, dim 256, GQA 4/2 heads, vocab 576 (>= the tiny tokenizer's 551 ids): 3.3M parameters, tied embeddings.
# Every dimension is a multiple of 64 so that NF4 quantisation (QLoRA) applies to every linear layer.
TINY_LLAMA_ARGS: dict[str, Any] = dict(
    vocab_size=576, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=256, max_seq_len=512,
    intermediate_dim=768, rope_base=500_000, norm_eps=1e-5, scale_factor=32,
)  # fmt: skip


def tiny_llama() -> TransformerDecoder:
    """The tiny model with fresh, sensibly initialised weights."""
    model = llama3_2(**TINY_LLAMA_ARGS)
    nn.init.normal_(model.tok_embeddings.weight, mean=0.0, std=0.02)
    return model


def lora_tiny_llama(
    lora_attn_modules: list[str],
    apply_lora_to_mlp: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """The tiny model with LoRA (or DoRA) adapters; ``quantize_base=True`` stores the base weights in NF4.

    Its base weights are meant to be loaded from a checkpoint; the output projection is tied to the embedding,
    so ``apply_lora_to_output`` is not offered (torchtune's tied-embedding builders refuse it too).
    """
    return lora_llama3_2(
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=False,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        **TINY_LLAMA_ARGS,
    )


def _special_token_ids(tokenizer_dir: str | Path = TOKENIZER_DIR) -> dict[str, int]:
    added = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())["added_tokens"]
    return {token["content"]: token["id"] for token in added}


def hf_config(
    dtype: torch.dtype = torch.float32, tokenizer_dir: str | Path = TOKENIZER_DIR, args: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``config.json`` for a Llama-3.2 model built from ``args`` (default: the tiny model's ``TINY_LLAMA_ARGS``)
    in transformers' ``LlamaForCausalLM`` schema, with tied embeddings."""
    args = args or TINY_LLAMA_ARGS
    special = _special_token_ids(tokenizer_dir)
    stop_ids = [special["<|end_of_text|>"], special["<|eot_id|>"]]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args["vocab_size"],
        "hidden_size": args["embed_dim"],
        "intermediate_size": args["intermediate_dim"],
        "num_hidden_layers": args["num_layers"],
        "num_attention_heads": args["num_heads"],
        "num_key_value_heads": args["num_kv_heads"],
        "head_dim": args["embed_dim"] // args["num_heads"],
        "max_position_embeddings": args["max_seq_len"],
        "rms_norm_eps": args["norm_eps"],
        "rope_theta": float(args["rope_base"]),
        "rope_scaling": {
            "factor": float(args["scale_factor"]),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },  # fmt: skip
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": special["<|begin_of_text|>"],
        "eos_token_id": stop_ids,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def save_hf_checkpoint(
    model: nn.Module, out_dir: str | Path, tokenizer_dir: str | Path = TOKENIZER_DIR, args: dict[str, Any] | None = None
) -> Path:
    """Save a (non-LoRA) tiny model as ``config.json`` + ``model.safetensors`` + tokenizer files; ``args``
    (default ``TINY_LLAMA_ARGS``) are the ``llama3_2`` builder arguments of a model of another size.

    The directory is written under a temporary name and renamed into place, so an interrupted save never
    leaves a half-written checkpoint behind; an existing ``out_dir`` is replaced.
    """
    args = args or TINY_LLAMA_ARGS
    state = tune_to_hf(
        model.state_dict(), num_heads=args["num_heads"], num_kv_heads=args["num_kv_heads"], dim=args["embed_dim"]
    )
    config = hf_config(next(iter(state.values())).dtype, tokenizer_dir, args)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    return write_hf_dir(out_dir, state, config, tokenizer_dir, {"generation_config.json": generation})


def write_hf_dir(
    out_dir: str | Path,
    hf_state: dict[str, torch.Tensor],
    config: dict[str, Any],
    tokenizer_dir: str | Path = TOKENIZER_DIR,
    more_json: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """``model.safetensors`` (``hf_state``), ``config.json``, ``more_json`` files and the tokenizer files in
    ``out_dir``, written under a temporary name and renamed into place (an existing ``out_dir`` is replaced)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    save_file({k: v.contiguous().clone() for k, v in hf_state.items()}, tmp_dir / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    for name, value in {"config.json": config, **(more_json or {})}.items():
        (tmp_dir / name).write_text(json.dumps(value, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / name, tmp_dir / name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
    return out_dir
