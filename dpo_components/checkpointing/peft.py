"""LoRA/DoRA adapters in and out of Hugging Face layout: merged weights, PEFT adapters (with the q/k row order and the
fused Phi projections torchtune 0.6.1 gets wrong), and reading a PEFT adapter back into torchtune's names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune.modules.peft import get_adapter_state_dict, get_lora_module_names, get_merged_lora_ckpt

ADAPTER_DIR = "adapter"  # step_<N>/adapter/: the PEFT adapter (see the module docstring for why not beside the model)


PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")


TUNE_ADAPTER_FILE = "adapter_model.torchtune.safetensors"  # families torchtune cannot convert to PEFT (Phi)


# torchtune model types whose RoPE uses Hugging Face's half-split layout, so their q/k weights are converted without
# torchtune's interleaving permutation. torchtune 0.6.1's PEFT export gets the q/k rows of adapters wrong both ways:
# it permutes ``lora_B`` for every family (wrong for Qwen: logits 0.16 off in ``peft`` on the tiny Qwen2.5 when
# lora_B is not near zero) and never the DoRA magnitude (wrong for the permuted families: 0.45 off on the tiny
# Mistral). :func:`_rows_for_torchtune_peft_export` prepares the adapter so that its export comes out right.
HALF_SPLIT_ROPE = ("QWEN2", "PHI3_MINI", "PHI4")


def merged_lora_state_dict(model: nn.Module, rank: int, alpha: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Base + LoRA (or DoRA) merged into plain weights, in ``dtype``, on CPU; the model is left untouched.

    NF4 (QLoRA) base weights are dequantized to ``dtype``. (torchtune's recipes merge into ``v.cpu()``, which on
    a CPU run is the live parameter itself, so its merge silently adds the LoRA delta into the training weights.)
    """
    return merge_lora_state(model.state_dict(), rank, alpha, dtype)


def merge_lora_state(
    state: dict[str, torch.Tensor], rank: int, alpha: float, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """:func:`merged_lora_state_dict` of a full (e.g. gathered) state dict: new CPU tensors, the input untouched."""
    plain = {}
    for key, value in state.items():
        if isinstance(value, NF4Tensor):
            value = value.get_original_weight()
        plain[key] = value.detach().to(device="cpu", dtype=dtype if value.is_floating_point() else None).clone()
    return get_merged_lora_ckpt(plain, rank=rank, alpha=alpha)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA/DoRA parameters only (torchtune key names), detached copies on CPU."""
    return {k: v.detach().cpu().clone() for k, v in get_adapter_state_dict(model.state_dict()).items()}


def _to_hf_rows(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows (dim 0) of a q/k projection from torchtune's interleaved RoPE layout to HF's half-split one (torchtune's
    ``_permute_lora_matrix``); ``t`` is ``[rows]`` or ``[rows, k]``."""
    return t.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(t.shape)


def _from_hf_rows(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """The inverse of :func:`_to_hf_rows`."""
    return t.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(t.shape)


def _qk_rows(key: str, hf_config: dict[str, Any]) -> tuple[int, int] | None:
    """(heads, head_dim) when ``key`` is a q or k projection's adapter tensor, else None."""
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    if ".q_proj." in key:
        return hf_config["num_attention_heads"], head_dim
    if ".k_proj." in key:
        return hf_config["num_key_value_heads"], head_dim
    return None


def qk_permuted(checkpointer: Any) -> bool:
    """Whether ``checkpointer``'s HF conversion permutes q/k rows (Llama-style interleaved RoPE in torchtune)."""
    return checkpointer._model_type.name not in HALF_SPLIT_ROPE


def _rows_for_torchtune_peft_export(adapter: dict[str, torch.Tensor], checkpointer: Any) -> dict[str, torch.Tensor]:
    """The adapter with its q/k rows arranged so that torchtune's PEFT export (which permutes every ``lora_B`` and
    no magnitude) writes them in the HF model's row order."""
    permuted, out = qk_permuted(checkpointer), dict(adapter)
    for key, value in adapter.items():
        rows = _qk_rows(key, checkpointer._config)
        if rows is not None and not permuted and key.endswith("lora_b.weight"):
            out[key] = _from_hf_rows(value, *rows)  # undone by the export's permutation
        elif rows is not None and permuted and key.endswith("magnitude"):
            out[key] = _to_hf_rows(value, *rows)  # the export leaves it as it is
    return out


# Phi-3/Phi-4's fused Hugging Face projections: (HF module, its torchtune parts in row order)
_FUSED = {"self_attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "mlp.gate_up_proj": ("mlp.w1", "mlp.w3")}


_UNFUSED = {"attn.output_proj": "self_attn.o_proj", "mlp.w2": "mlp.down_proj"}


def fused_peft_adapter(
    adapter: dict[str, torch.Tensor], config: dict[str, Any], hf_config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A LoRA adapter in torchtune's names as a PEFT adapter of a model with fused q/k/v and gate/up projections
    (Phi-3, Phi-4), exactly: LoRA on k of the parts, each of rank r, is one LoRA of rank k r on the fused projection
    with A the parts' A stacked and B block-diagonal (zero rows for a part without LoRA); its alpha is k alpha so
    that alpha / rank stays alpha / r (``rank_pattern``/``alpha_pattern`` in ``adapter_config.json``)."""
    r, alpha = config["r"], config["lora_alpha"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    rows = {"attn.q_proj": hf_config["num_attention_heads"] * head_dim, "attn.k_proj": hf_config["num_key_value_heads"]
            * head_dim, "attn.v_proj": hf_config["num_key_value_heads"] * head_dim,
            "mlp.w1": hf_config["intermediate_size"], "mlp.w3": hf_config["intermediate_size"]}  # fmt: skip
    out, ranks = {}, {}
    for layer in range(hf_config["num_hidden_layers"]):
        for fused, parts in _FUSED.items():
            present = [p for p in parts if f"layers.{layer}.{p}.lora_a.weight" in adapter]
            if not present:
                continue
            dtype = adapter[f"layers.{layer}.{present[0]}.lora_b.weight"].dtype
            lora_b = torch.zeros(sum(rows[p] for p in parts), r * len(present), dtype=dtype)
            for i, part in enumerate(present):
                start = sum(rows[p] for p in parts[: parts.index(part)])
                lora_b[start : start + rows[part], i * r : (i + 1) * r] = adapter[
                    f"layers.{layer}.{part}.lora_b.weight"
                ]
            stacked_a = [adapter[f"layers.{layer}.{p}.lora_a.weight"] for p in present]
            out[f"base_model.model.model.layers.{layer}.{fused}.lora_A.weight"] = torch.cat(stacked_a)
            out[f"base_model.model.model.layers.{layer}.{fused}.lora_B.weight"] = lora_b
            ranks[fused.split(".")[-1]] = len(present)
        for part, hf_name in _UNFUSED.items():
            for matrix in ("a", "b"):
                key = f"layers.{layer}.{part}.lora_{matrix}.weight"
                if key in adapter:
                    out[f"base_model.model.model.layers.{layer}.{hf_name}.lora_{matrix.upper()}.weight"] = adapter[key]
    for matrix in ("a", "b"):
        if f"output.lora_{matrix}.weight" in adapter:
            out[f"base_model.model.lm_head.lora_{matrix.upper()}.weight"] = adapter[f"output.lora_{matrix}.weight"]
    targets = sorted({key.split(".")[-3] for key in out})
    peft_config = {"r": r, "lora_alpha": alpha, "peft_type": "LORA", "task_type": "CAUSAL_LM", "use_dora": False,
                   "bias": "none", "target_modules": targets,
                   "rank_pattern": {name: k * r for name, k in ranks.items()},
                   "alpha_pattern": {name: k * alpha for name, k in ranks.items()}}  # fmt: skip
    return {k: v.contiguous() for k, v in out.items()}, peft_config


# transformers 5's module paths of MllamaForConditionalGeneration for the checkpoint keys torchtune's converter writes
_MLLAMA_MODULES = (("language_model.model.", "model.language_model."), ("vision_model.", "model.vision_model."),
                   ("multi_modal_projector.", "model.multi_modal_projector."), ("language_model.lm_head.", "lm_head."))


def mllama_peft_adapter(
    adapter: dict[str, torch.Tensor], config: dict[str, Any], hf_config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A Llama 3.2 Vision LoRA adapter in torchtune's names as a PEFT adapter of transformers'
    ``MllamaForConditionalGeneration`` (torchtune 0.6.1 exports none for this family). Each adapted linear's name is
    what torchtune's own ``llama3_vision_tune_to_hf`` makes of its weight's key (cross-attention layers numbered
    among the self-attention ones, encoder and projector renamed); ``lora_B`` rows of the text self-attention's q/k
    follow that converter's q/k permutation. ``target_modules`` names exactly the adapted modules (a full-match
    regex), so PEFT adds no adapter the run did not train."""
    from torchtune.models.llama3_2_vision._convert_weights import llama3_vision_tune_to_hf

    text, vision = hf_config["text_config"], hf_config["vision_config"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    convert = dict(num_heads=text["num_attention_heads"], num_kv_heads=text["num_key_value_heads"],
                   dim=text["hidden_size"], head_dim=head_dim, vocab_size=text["vocab_size"],
                   cross_attention_layers=text.get("cross_attention_layers"), encoder_dim=vision["hidden_size"],
                   tile_size=vision["image_size"], num_tiles=vision["max_num_tiles"],
                   supported_aspect_ratios=vision.get("supported_aspect_ratios"))  # fmt: skip
    out, modules = {}, []
    for key in sorted(k for k in adapter if k.endswith("lora_a.weight")):
        base = key.removesuffix("lora_a.weight")
        lora_a, lora_b = adapter[key], adapter[f"{base}lora_b.weight"]
        weight = torch.zeros(lora_b.shape[0], lora_a.shape[1])  # only its key and shape matter to the converter
        (hf_key,) = llama3_vision_tune_to_hf({f"{base}weight": weight}, **convert)
        module = hf_key.removesuffix(".weight")
        for old, new in _MLLAMA_MODULES:
            if module.startswith(old):
                module = new + module.removeprefix(old)
                break
        if module.startswith("model.language_model.") and module.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = text["num_attention_heads"] if module.endswith("q_proj") else text["num_key_value_heads"]
            lora_b = _to_hf_rows(lora_b, heads, head_dim)  # the converter permutes these weights' rows
        out[f"base_model.model.{module}.lora_A.weight"] = lora_a.contiguous()
        out[f"base_model.model.{module}.lora_B.weight"] = lora_b.contiguous()
        modules.append(module)
    peft_config = {"r": config["r"], "lora_alpha": config["lora_alpha"], "peft_type": "LORA", "task_type": None,
                   "use_dora": False, "bias": "none",
                   "target_modules": "^(" + "|".join(re.escape(m) for m in modules) + ")$"}  # fmt: skip
    return out, peft_config


def peft_layout(checkpointer: Any) -> dict[str, Any]:
    """The arguments of :func:`load_peft_adapter` for a model loaded by the HF ``checkpointer``."""
    hf = checkpointer._config.get("text_config", checkpointer._config)  # Llama 3.2 Vision nests the text model's
    return {"num_heads": hf["num_attention_heads"], "num_kv_heads": hf["num_key_value_heads"], "dim": hf["hidden_size"],
            "head_dim": hf.get("head_dim"), "permuted_qk": qk_permuted(checkpointer)}  # fmt: skip


def load_peft_adapter(
    checkpoint_dir: str | Path,
    num_heads: int,
    num_kv_heads: int,
    dim: int,
    head_dim: int | None = None,
    permuted_qk: bool = True,
) -> dict[str, torch.Tensor]:
    """Read a checkpoint's ``adapter/adapter_model.safetensors`` (PEFT layout) back into torchtune key names: the
    inverse of the conversion in :func:`save_checkpoint_dir`, including the q/k ``lora_B`` permutation where the
    family's q/k weights are permuted (``permuted_qk``; see :func:`peft_layout`). (Older checkpoints, with the
    adapter beside the model, are read too.)"""
    hf = {"num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "hidden_size": dim,
          "head_dim": head_dim}  # fmt: skip
    if (Path(checkpoint_dir) / ADAPTER_DIR / TUNE_ADAPTER_FILE).is_file():
        return load_file(Path(checkpoint_dir) / ADAPTER_DIR / TUNE_ADAPTER_FILE)
    path = Path(checkpoint_dir) / ADAPTER_DIR / PEFT_FILES[0]
    peft = load_file(path if path.is_file() else Path(checkpoint_dir) / PEFT_FILES[0])
    renames = [
        (r"^base_model\.model\.model\.layers\.", "layers."),
        (r"\.self_attn\.o_proj\.", ".attn.output_proj."),
        (r"\.self_attn\.", ".attn."),
        (r"\.mlp\.gate_proj\.", ".mlp.w1."),
        (r"\.mlp\.down_proj\.", ".mlp.w2."),
        (r"\.mlp\.up_proj\.", ".mlp.w3."),
        (r"^base_model\.model\.lm_head\.", "output."),
        (r"\.lora_A\.weight$", ".lora_a.weight"),
        (r"\.lora_B\.weight$", ".lora_b.weight"),
        (r"\.lora_magnitude_vector$", ".magnitude"),
    ]
    tune = {}
    for key, value in peft.items():
        new_key = key
        for pattern, replacement in renames:
            new_key = re.sub(pattern, replacement, new_key)
        rows = _qk_rows(new_key, hf)
        if permuted_qk and rows is not None and new_key.endswith(("lora_b.weight", "magnitude")):
            value = _from_hf_rows(value, *rows)
        tune[new_key] = value
    return tune


def lora_settings(cfg_model: Any) -> dict[str, Any]:
    """The LoRA hyper-parameters a recipe needs for merging and for the PEFT config, read from the model config."""
    return {
        "rank": cfg_model.lora_rank,
        "alpha": cfg_model.lora_alpha,
        "attn_modules": list(cfg_model.lora_attn_modules),
        "mlp": cfg_model.get("apply_lora_to_mlp", False),
        "output": cfg_model.get("apply_lora_to_output", False),
        "dora": cfg_model.get("use_dora", False),
    }


def peft_adapter_config(lora: dict[str, Any]) -> dict[str, Any]:
    """``adapter_config.json`` for PEFT from :func:`lora_settings` (torchtune adds ``base_model_name_or_path``)."""
    return {
        "r": lora["rank"], "lora_alpha": lora["alpha"], "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "use_dora": lora["dora"], "bias": "none",
        "target_modules": get_lora_module_names(lora["attn_modules"], lora["mlp"], lora["output"]),
    }  # fmt: skip
