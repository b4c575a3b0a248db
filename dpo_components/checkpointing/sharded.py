"""The FSDP2 recipes' checkpoints: one writer and one reader for both, with the rank-0 work and the barriers here.

``step_<N>/`` holds the distributed-checkpoint shards of the trainable parameters and their optimizer state
(``dcp/``, each rank writes its own), every rank's RNG (``rng_rank<r>.pt``), ``recipe_state.pt`` (progress, LR
schedule, the run's fingerprint), optionally Hugging Face files written by rank 0 (the consolidated model, a PEFT
adapter), and ``manifest.json``. It is written as ``.step_<N>.tmp`` and renamed by rank 0 once whole; the
manifest, written last, hashes every file once. An exact resume needs the same world size (the fingerprint holds
it). Every function here is a collective: all ranks call it, in the same order.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from torchtune import training
from torchtune.modules.peft import get_adapter_state_dict

from dpo_components.checkpointing.directory import RECIPE_STATE_FILE, write_manifest
from dpo_components.checkpointing.fingerprint import check_same_run
from dpo_components.checkpointing.hf import write_hf_files
from dpo_components.checkpointing.peft import merge_lora_state, peft_adapter_config
from dpo_components.checkpointing.state import load_recipe_state, load_state_file, rng_state, set_rng_state
from dpo_components.files import torch_save, writing
from dpo_components.settings import ConfigError

log = logging.getLogger(__name__)
PROGRESS_KEYS = ("global_step", "epochs_run", "batches_done_in_epoch")


def save_sharded_checkpoint(
    checkpoint_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    recipe_state: dict[str, Any],
    *,
    adapters_only: bool = False,
    hf_files: Callable[[], dict[str, Any] | None] | None = None,
    checkpointer: Any = None,
    hf_dtype: torch.dtype | None = None,
) -> None:
    """Write ``checkpoint_dir`` atomically (collective).

    ``recipe_state``: the progress counters, ``lr_scheduler`` state and ``run`` fingerprint. ``hf_files``, called
    on every rank (it may gather the sharded model: a collective), returns on rank 0 the keyword arguments of
    :func:`~dpo_components.checkpointing.hf.write_hf_files` (``model_state``, ``adapter_state``,
    ``adapter_config``), which rank 0 writes with the HF ``checkpointer``, its tensors cast to ``hf_dtype`` (the run's
    dtype: the shards may hold fp32 master weights). On an error the temporary directory is
    removed and the error raised; the other checkpoints stay as they were.
    """
    rank = dist.get_rank()
    tmp = checkpoint_dir.parent / f".{checkpoint_dir.name}.tmp"
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        model_shards, optim_shards = _state_shards(model, optimizer, adapters_only)
        with writing(tmp / "dcp", "checkpoint shards"):
            dcp.save({"model": model_shards, "optimizer": optim_shards}, checkpoint_id=str(tmp / "dcp"))
        torch_save(rng_state(), tmp / f"rng_rank{rank}.pt")
        hf = hf_files() if hf_files is not None else None
        dist.barrier()  # every rank's files are written before rank 0 completes and renames the directory
        if rank == 0:
            if hf:
                with writing(tmp, "the Hugging Face files of"):
                    write_hf_files(checkpointer, tmp, **_cast_floats(hf, hf_dtype))
            torch_save(recipe_state, tmp / RECIPE_STATE_FILE)
            write_manifest(tmp, run=recipe_state.get("run"))  # last: a checkpoint is complete only with it
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            os.replace(tmp, checkpoint_dir)
        dist.barrier()
    except Exception:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _state_shards(model: nn.Module, optimizer: torch.optim.Optimizer, adapters_only: bool) -> tuple[dict, dict]:
    """The model's and optimizer's sharded state (DCP's ``get_state_dict``); with ``adapters_only`` the model's
    trainable parameters only (LoRA: the adapters, not the frozen base). Filtered here rather than with DCP's
    ``ignore_frozen_params``, which looks the frozen parameters up by module path and so misses a key a module
    renames in its state dict (torchtune's ``FusionLayer`` and ``FusionEmbedding``: KeyError)."""
    model_shards, optim_shards = get_state_dict(model, optimizer)
    if adapters_only:
        trainable = {key for key, value in model.state_dict(keep_vars=True).items()
                     if isinstance(value, nn.Parameter) and value.requires_grad}  # fmt: skip
        model_shards = {key: value for key, value in model_shards.items() if key in trainable}
    return model_shards, optim_shards


def full_model_files(model: nn.Module, device: torch.device) -> Callable[[], dict[str, Any] | None]:
    """``hf_files`` of a full-parameter model: the whole model gathered to rank 0's CPU memory (every rank takes
    part in the gather; rank 0 gets the weights)."""

    def files() -> dict[str, Any] | None:
        full = training.gather_cpu_state_dict(model, dist.get_rank() == 0, device=device)
        return {"model_state": full} if dist.get_rank() == 0 else None

    return files


def lora_model_files(
    model: nn.Module, lora: dict[str, Any], dtype: torch.dtype, device: torch.device, consolidate: bool
) -> Callable[[], dict[str, Any] | None]:
    """``hf_files`` of a LoRA model: the PEFT adapter gathered to rank 0 at every save, and with ``consolidate`` the
    whole model, merged (base, dequantized for QLoRA, + LoRA, in ``dtype``) for the HF weights; all ranks take
    part in the gather."""

    def files() -> dict[str, Any] | None:
        rank_zero = dist.get_rank() == 0
        if consolidate:
            full = training.gather_cpu_state_dict(model, rank_zero, device=device)
            adapter = get_adapter_state_dict(full)
        else:
            adapter = {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v.detach().cpu()
                       for k, v in model.state_dict().items() if "lora" in k or "magnitude" in k}  # fmt: skip
        if not rank_zero:
            return None
        merged = merge_lora_state(full, lora["rank"], lora["alpha"], dtype) if consolidate else None
        return {"model_state": merged, "adapter_state": adapter, "adapter_config": peft_adapter_config(lora)}

    return files


def _cast_floats(hf: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    """``hf`` with the floating tensors of its ``model_state`` and ``adapter_state`` in ``dtype`` (None: unchanged)."""
    if dtype is None:
        return hf
    cast = lambda state: {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return {k: cast(v) if k in ("model_state", "adapter_state") and v is not None else v for k, v in hf.items()}


def load_sharded_checkpoint(
    checkpoint_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    run: dict[str, Any],
    *,
    adapters_only: bool = False,
) -> dict[str, int]:
    """Load what :func:`save_sharded_checkpoint` wrote into the sharded ``model`` and ``optimizer``, the LR schedule
    and this rank's RNG; return the progress counters (collective). Refuses (``ConfigError``, naming each key) a
    checkpoint of a run with other settings (the world size included: the shards are per rank). With
    ``adapters_only`` the frozen base is not in the checkpoint, and every adapter key must be."""
    state = load_recipe_state(checkpoint_dir)
    check_same_run(checkpoint_dir, state["run"], run)
    model_shards, optim_shards = _state_shards(model, optimizer, adapters_only)
    shards = {"model": model_shards, "optimizer": optim_shards}
    dcp.load(shards, checkpoint_id=str(checkpoint_dir / "dcp"))
    options = StateDictOptions(strict=False) if adapters_only else None
    incompatible = set_state_dict(model, optimizer, model_state_dict=shards["model"],
                                  optim_state_dict=shards["optimizer"], options=options)  # fmt: skip
    if adapters_only:
        missing = [k for k in incompatible.missing_keys if "lora" in k or "magnitude" in k]
        if missing or incompatible.unexpected_keys:
            raise ConfigError(f"{checkpoint_dir} does not fit this model's adapters: missing {missing[:5]}, "
                              f"unexpected {incompatible.unexpected_keys[:5]}")  # fmt: skip
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    set_rng_state(load_state_file(checkpoint_dir / f"rng_rank{dist.get_rank()}.pt"))
    return {key: state[key] for key in PROGRESS_KEYS}
