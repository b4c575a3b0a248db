"""The policy and reference models of the recipes, built from the YAML ``model`` component in one place:

    lora_model            LoRA / QLoRA / DoRA on one device: base loaded, adapters trainable (or resumed)
    sharded_lora_model    the same under FSDP2: built on the meta device, sharded, loaded
    full_or_lora_model    whatever the builder makes (all parameters, or a LoRA model), on one device
    trainable_policy      ... then made the policy: adapters trainable, resumed, transformed, checkpointed, compiled
    sharded_model         a full-parameter model under FSDP2: the trainable policy or a frozen reference
    load_resumed_weights  a checkpoint's adapter (LoRA) or full weights into a one-device policy

Every model goes through :func:`~dpo_components.models.apply_model_fixes` (DoRA as exported, fused RMSNorm,
attention one document at a time).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import config, modules, training
from torchtune.modules.peft import get_adapter_params, set_trainable_params, validate_missing_and_unexpected_for_lora
from torchtune.utils import get_logger

from dpo_components.checkpointing import load_peft_adapter, lora_settings, peft_layout
from dpo_components.distributed import initial_adapter_state, shard_and_load
from dpo_components.models import apply_model_fixes
from dpo_components.models.quantization import nf4_estimate
from dpo_components.precision import fsdp_mixed_precision, trainable_to
from dpo_components.settings import ConfigError, RecipeSettings, optional_component

log = get_logger("INFO")


def lora_model(
    cfg_model: DictConfig, settings: RecipeSettings, base_state: dict[str, Any], adapter: dict[str, Any] | None = None
) -> nn.Module:
    """A LoRA/QLoRA/DoRA policy on ``settings.device`` in ``settings.dtype``: only the adapters trainable,
    activation checkpointing as set, the base weights loaded (quantized to NF4 with ``quantize_base``), then the
    ``adapter`` of a resumed checkpoint or, for a fresh DoRA run, the magnitudes from the base weights; every key
    checked by torchtune's LoRA validation; compiled with ``compile``."""
    start, qlora = time.perf_counter(), cfg_model.get("quantize_base", False)
    if qlora:  # torchtune quantizes each base linear twice: at build (the random init) and when the weights load
        log.info(f"QLoRA: quantizing the base linears to NF4 {nf4_estimate(base_state, settings.device)} ...")
    with training.set_default_dtype(settings.dtype), settings.device:
        model = apply_model_fixes(config.instantiate(cfg_model))
    lora = lora_settings(cfg_model)
    set_trainable_params(model, get_adapter_params(model))
    if settings.activation_checkpointing:
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})

    base_missing, base_unexpected = model.load_state_dict(base_state, strict=False)
    lora_missing = lora_unexpected = None
    if adapter is not None:
        lora_missing, lora_unexpected = model.load_state_dict(adapter, strict=False)
    elif lora["dora"]:
        initialize_dora_magnitudes(model)
    validate_missing_and_unexpected_for_lora(
        lora_attn_modules=lora["attn_modules"], apply_lora_to_mlp=lora["mlp"], apply_lora_to_output=lora["output"],
        base_missing=base_missing, base_unexpected=base_unexpected, lora_missing=lora_missing,
        lora_unexpected=lora_unexpected,
    )  # fmt: skip
    if qlora:
        log.info(f"QLoRA: NF4 base ready in {time.perf_counter() - start:.0f} s")
    if settings.compile:
        training.compile_model(model)  # per layer; padded lengths vary, see pad_to_multiple_of
    return model


def sharded_lora_model(
    cfg_model: DictConfig, settings: RecipeSettings, base_state: dict[str, Any], seed: int
) -> nn.Module:
    """:func:`lora_model` under FSDP2: built on the meta device, only the adapters trainable and in
    ``master_dtype`` (fp32 master shards; FSDP computes in ``dtype``), sharded per transformer layer, the base and
    the starting adapters loaded (the same for any world size: ``distributed.initial_adapter_state``). A resume
    loads its adapters from the checkpoint's shards afterwards. QLoRA needs 2 or more ranks."""
    s = settings
    with training.set_default_dtype(s.dtype), torch.device("meta"):
        model = apply_model_fixes(config.instantiate(cfg_model))
    set_trainable_params(model, get_adapter_params(model))
    adapters = initial_adapter_state(model, base_state, seed)  # before checkpoint wrappers rename modules
    trainable_to(model, s.master_dtype)
    if s.activation_checkpointing:
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    shard_and_load(model, {**base_state, **adapters}, s.device, s.dtype, reshard=s.fsdp_reshard_after_forward,
                   mp_policy=fsdp_mixed_precision(s.dtype, s.master_dtype))  # fmt: skip
    if s.compile:
        training.compile_model(model)
    return model


def full_or_lora_model(cfg_model: DictConfig, settings: RecipeSettings, state: dict[str, Any]) -> nn.Module:
    """What the ``model`` builder makes (a plain builder: every parameter trains; a ``lora_*``/``qlora_*`` builder:
    a LoRA model) on one device, with ``state`` loaded: every key but the adapters' must fit; DoRA magnitudes from
    the loaded weights. Trainability, checkpointing and compile are the caller's (a frozen reference is built here
    too)."""
    with training.set_default_dtype(settings.dtype), settings.device:
        model = apply_model_fixes(config.instantiate(cfg_model))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lora_" not in k and "magnitude" not in k]:
        raise ConfigError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    initialize_dora_magnitudes(model)
    return model


def trainable_policy(
    model: nn.Module, cfg: DictConfig, settings: RecipeSettings, checkpointer: Any, resume_dir: Path | None
) -> nn.Module:
    """A :func:`full_or_lora_model` made the policy, after the reference was taken from its starting weights: only
    the adapters trainable for a LoRA model, a resumed checkpoint's weights loaded, ``model_transform`` applied
    (int8 / float8 training, full-parameter only), activation checkpointing and compile as set."""
    lora = bool(get_adapter_params(model))
    if lora:
        set_trainable_params(model, get_adapter_params(model))
    if resume_dir is not None:
        load_resumed_weights(model, cfg.checkpointer, checkpointer, resume_dir)
    transform = optional_component(cfg, "model_transform")
    if transform is not None:
        if lora:
            raise ConfigError("model_transform (int8/float8 training) applies to full-parameter training only")
        model = config.instantiate(transform, model)
    if settings.activation_checkpointing:
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    if settings.compile:
        training.compile_model(model)
    return model


def sharded_model(cfg_model: DictConfig, settings: RecipeSettings, state: dict[str, Any], trainable: bool) -> nn.Module:
    """A full-parameter model under FSDP2, built on the meta device, sharded per transformer layer and loaded from
    ``state``. ``trainable``: the policy, whose shards are ``master_dtype`` (fp32 master weights, stepped by the
    optimizer and saved by DCP) while FSDP computes in ``dtype``, with activation checkpointing and compile as set;
    else a frozen reference in ``dtype``, eval mode, no grads."""
    s = settings
    with training.set_default_dtype(s.master_dtype if trainable else s.dtype), torch.device("meta"):
        model = apply_model_fixes(config.instantiate(cfg_model))  # fused RMSNorm under bf16
    if trainable and s.activation_checkpointing:
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    shard_and_load(model, state, s.device, s.dtype, reshard=s.fsdp_reshard_after_forward,
                   mp_policy=fsdp_mixed_precision(s.dtype, s.master_dtype) if trainable else None)  # fmt: skip
    if not trainable:
        return model.eval().requires_grad_(False)
    if s.compile:
        training.compile_model(model)
    return model


def load_resumed_weights(
    model: nn.Module, cfg_checkpointer: DictConfig, checkpointer: Any, checkpoint_dir: Path
) -> None:
    """A resumed checkpoint's policy weights into a one-device ``model``: its PEFT adapter for a LoRA model, else
    the full HF weights (read with the run's checkpointer class)."""
    if get_adapter_params(model):
        adapter = load_peft_adapter(checkpoint_dir, **peft_layout(checkpointer))
        _, unexpected = model.load_state_dict(adapter, strict=False)
    else:
        files = sorted(p.name for p in checkpoint_dir.glob("model-*.safetensors"))
        resumed = config.instantiate(cfg_checkpointer, checkpoint_dir=str(checkpoint_dir), checkpoint_files=files,
                                     resume_from_checkpoint=False)  # fmt: skip
        _, unexpected = model.load_state_dict(resumed.load_checkpoint()[training.MODEL_KEY])
    if unexpected:
        raise ConfigError(f"{checkpoint_dir} does not fit the model: unexpected keys {unexpected[:5]}")


def initialize_dora_magnitudes(model: nn.Module) -> None:
    """DoRA's magnitudes from the loaded base weights (torchtune leaves them to the recipe)."""
    for module in model.modules():
        if hasattr(module, "initialize_dora_magnitude"):
            module.initialize_dora_magnitude()
