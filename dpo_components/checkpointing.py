"""Checkpoints in Hugging Face layout, written atomically, and read back for resume without pickle.

A checkpoint is one directory, ``<output_dir>/step_<N>/``:

    model-00001-of-0000K.safetensors + model.safetensors.index.json + config.json + tokenizer files
        the merged full model (base + LoRA), in HF key layout: ``transformers`` and vLLM load it as is;
    adapter_model.safetensors + adapter_config.json
        the LoRA adapter in PEFT layout (``PeftModel.from_pretrained(base, dir)``);
    recipe_state.pt
        what an exact resume needs: optimizer, LR schedule, step, data position, RNG (tensors and plain
        Python values only, read back with ``torch.load(weights_only=True)``).

The HF conversion (key names, q/k permutation, sharding like the source checkpoint, copying config and tokenizer
files) is torchtune's ``FullModelHFCheckpointer``; we point it at a temporary directory, drop the pickled
``adapter_model.pt`` it writes, and rename the finished directory into place, so an interrupted save never
leaves a half-written ``step_<N>`` behind.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune import training
from torchtune.modules.peft import get_adapter_state_dict, get_lora_module_names, get_merged_lora_ckpt

from dpo_components.training import rng_state, set_rng_state

RECIPE_STATE_FILE = "recipe_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def merged_lora_state_dict(model: nn.Module, rank: int, alpha: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Base + LoRA (or DoRA) merged into plain weights, in ``dtype``, on CPU; the model is left untouched.

    NF4 (QLoRA) base weights are dequantized to ``dtype``. (torchtune's recipes merge into ``v.cpu()``, which on
    a CPU run is the live parameter itself, so its merge silently adds the LoRA delta into the training weights.)
    """
    state = {}
    for key, value in model.state_dict().items():
        if isinstance(value, NF4Tensor):
            value = value.get_original_weight()
        state[key] = value.detach().to(device="cpu", dtype=dtype if value.is_floating_point() else None).clone()
    return get_merged_lora_ckpt(state, rank=rank, alpha=alpha)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA/DoRA parameters only (torchtune key names), detached copies on CPU."""
    return {k: v.detach().cpu().clone() for k, v in get_adapter_state_dict(model.state_dict()).items()}


def remove_stale_temporaries(output_dir: str | Path) -> list[Path]:
    """Remove the ``.step_<N>.tmp*`` directories that a killed or failed save left in ``output_dir``; returns them.

    They are never checkpoints (a save is renamed into place only when whole) and hold a full copy of the weights
    each. One whose name carries the pid of a live process on this machine (a save in progress) is kept.
    """
    removed = []
    for path in sorted(Path(output_dir).glob(".step_*.tmp*")):
        pid = path.name.rpartition(".tmp-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logging.getLogger(__name__).warning("removed %d unfinished checkpoint(s): %s", len(removed),
                                            ", ".join(p.name for p in removed))  # fmt: skip
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_checkpoint_dir(
    checkpointer: Any,
    out_dir: str | Path,
    model_state: dict[str, torch.Tensor],
    adapter_state: dict[str, torch.Tensor] | None = None,
    adapter_config: dict[str, Any] | None = None,
    recipe_state: dict[str, Any] | None = None,
) -> Path:
    """Write one checkpoint directory atomically with torchtune's HF checkpointer; returns its path.

    ``checkpointer`` is a ``FullModelHFCheckpointer`` whose ``load_checkpoint`` has run (it learns the source's
    sharding then). An existing ``out_dir`` is replaced.
    """
    out_dir = Path(out_dir)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    state: dict[str, Any] = {training.MODEL_KEY: model_state}
    if adapter_state is not None:
        state[training.ADAPTER_KEY] = adapter_state
        state[training.ADAPTER_CONFIG] = dict(adapter_config or {})
    saved_output_dir = checkpointer._output_dir
    checkpointer._output_dir = tmp_dir  # torchtune writes into <output_dir>/epoch_<n>/
    torchtune_log = logging.getLogger("torchtune.utils._logging")  # the logger all of torchtune logs to
    saved_level = torchtune_log.level
    torchtune_log.setLevel(logging.WARNING)  # its messages name the temporary directory; the caller logs the real one
    try:
        checkpointer.save_checkpoint(state, epoch=0, intermediate_checkpoint=False)
    finally:
        checkpointer._output_dir = saved_output_dir
        torchtune_log.setLevel(saved_level)
    written = tmp_dir / "epoch_0"
    for path in list(written.iterdir()):
        path.rename(tmp_dir / path.name)
    written.rmdir()
    (tmp_dir / "adapter_model.pt").unlink(missing_ok=True)  # a pickle; the safetensors copy is the adapter
    if recipe_state is not None:
        torch.save(recipe_state, tmp_dir / RECIPE_STATE_FILE)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
    return out_dir


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The ``step_<N>`` directory with the largest N that holds a recipe state, or None."""
    steps = []
    for path in Path(output_dir).glob("step_*"):
        match = _STEP_DIR.match(path.name)
        if match and (path / RECIPE_STATE_FILE).is_file():
            steps.append((int(match.group(1)), path))
    return max(steps)[1] if steps else None


def load_recipe_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint_dir) / RECIPE_STATE_FILE, weights_only=True)


def _unpermute_lora_b(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Undo torchtune's ``_permute_lora_matrix`` (HF's rotary layout -> torchtune's interleaved layout)."""
    rank = t.shape[-1]
    return t.view(n_heads, 2, head_dim // 2, rank).transpose(1, 2).reshape(head_dim * n_heads, rank)


def load_peft_adapter(
    checkpoint_dir: str | Path, num_heads: int, num_kv_heads: int, dim: int, head_dim: int | None = None
) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (PEFT layout) back into torchtune key names: the inverse of torchtune's
    ``tune_to_peft_adapter_weights``, including the q/k ``lora_B`` permutation."""
    head_dim = head_dim or dim // num_heads
    peft = load_file(Path(checkpoint_dir) / "adapter_model.safetensors")
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
        if new_key.endswith("lora_b.weight") and ".attn.q_proj." in new_key:
            value = _unpermute_lora_b(value, num_heads, head_dim)
        elif new_key.endswith("lora_b.weight") and ".attn.k_proj." in new_key:
            value = _unpermute_lora_b(value, num_kv_heads, head_dim)
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


def save_lora_checkpoint(
    checkpointer: Any, out_dir: Path, model: nn.Module, lora: dict[str, Any], dtype: torch.dtype, recipe_state: dict
) -> Path:
    """A LoRA checkpoint: the merged model, the PEFT adapter and its config, and the recipe state."""
    adapter_config = {
        "r": lora["rank"], "lora_alpha": lora["alpha"], "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "use_dora": lora["dora"], "bias": "none",
        "target_modules": get_lora_module_names(lora["attn_modules"], lora["mlp"], lora["output"]),
    }  # fmt: skip
    return save_checkpoint_dir(
        checkpointer,
        out_dir,
        model_state=merged_lora_state_dict(model, lora["rank"], lora["alpha"], dtype),
        adapter_state=adapter_state_dict(model),
        adapter_config=adapter_config,
        recipe_state=recipe_state,
    )


def training_state(
    progress: dict[str, int], optimizer: torch.optim.Optimizer, lr_scheduler: Any, run: dict[str, Any]
) -> dict[str, Any]:
    """What an exact resume needs. ``progress``: global_step, epochs_run, batches_done_in_epoch. ``run``: the
    settings that fix the data order (seed, batch size, ...), checked on resume."""
    return {**progress, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
            "rng": rng_state(), "run": run}  # fmt: skip


def restore_training_state(
    checkpoint_dir: Path, optimizer: torch.optim.Optimizer, lr_scheduler: Any, run: dict[str, Any]
) -> dict[str, int]:
    """Load optimizer, LR schedule and RNG from ``checkpoint_dir``; return the progress counters.

    Refuses (``ValueError``) when the run settings differ: the data order would not be the same.
    """
    state = load_recipe_state(checkpoint_dir)
    if state["run"] != run:
        raise ValueError(f"cannot resume exactly from {checkpoint_dir}: it was trained with {state['run']}, this run "
                         f"has {run}")  # fmt: skip
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    set_rng_state(state["rng"])
    return {key: state[key] for key in ("global_step", "epochs_run", "batches_done_in_epoch")}
