"""Checkpoints in Hugging Face layout, written atomically, and read back for resume without pickle.

A checkpoint is one directory, ``<output_dir>/step_<N>/``:

    model-00001-of-0000K.safetensors + model.safetensors.index.json + config.json + tokenizer files
        the merged full model (base + LoRA), in HF key layout: ``transformers`` and vLLM load it as is;
    adapter/adapter_model.safetensors + adapter/adapter_config.json
        the LoRA adapter in PEFT layout (``PeftModel.from_pretrained(base, "step_<N>/adapter")``). In a folder of
        its own: ``transformers`` with ``peft`` installed loads an adapter it finds beside a model's weights on top
        of them, so next to the merged model it would be applied twice. Phi-3/Phi-4, whose HF q/k/v (and gate/up)
        projections are fused and which torchtune cannot export, get our export (:func:`fused_peft_adapter`; LoRA
        only, not DoRA), and so does Llama 3.2 Vision (:func:`mllama_peft_adapter`), with
        ``adapter/adapter_model.torchtune.safetensors`` in torchtune's names, for resume;
    recipe_state.pt
        what an exact resume needs: optimizer, LR schedule, step, data position, RNG (tensors and plain
        Python values only, read back with ``torch.load(weights_only=True)``), and the run's fingerprint;
    manifest.json
        written last: every other file's size and BLAKE2b hash. A checkpoint is complete only with it.

The HF conversion (key names, q/k permutation, sharding like the source checkpoint, copying config and tokenizer
files) is torchtune's ``FullModelHFCheckpointer``; we point it at a temporary directory, drop the pickled
``adapter_model.pt`` it writes, and rename the finished directory into place, so an interrupted save never
leaves a half-written ``step_<N>`` behind.

Resume takes the newest checkpoint whose files match its manifest (a truncated or missing file is named, and the
one before it is used), and refuses to continue a run trained with other settings: the fingerprint holds the config
keys that shape the run and hashes of the base checkpoint and of the tokenized training data.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torchtune import training

from dpo_components.checkpointing.directory import RECIPE_STATE_FILE, write_manifest
from dpo_components.checkpointing.peft import (
    ADAPTER_DIR,
    PEFT_FILES,
    TUNE_ADAPTER_FILE,
    _rows_for_torchtune_peft_export,
    adapter_state_dict,
    fused_peft_adapter,
    merged_lora_state_dict,
    mllama_peft_adapter,
    peft_adapter_config,
)
from dpo_components.files import torch_save, writing

log = logging.getLogger(__name__)


def save_checkpoint_dir(
    checkpointer: Any,
    out_dir: str | Path,
    model_state: dict[str, torch.Tensor] | None,
    adapter_state: dict[str, torch.Tensor] | None = None,
    adapter_config: dict[str, Any] | None = None,
    recipe_state: dict[str, Any] | None = None,
) -> Path:
    """Write one checkpoint directory atomically: :func:`write_hf_files`, then ``recipe_state.pt``, then the
    manifest (each file hashed once); returns its path.

    An existing ``out_dir`` is replaced. On a failure (disk full, ...) the temporary directory is removed and the
    error raised; ``out_dir`` and every other checkpoint stay as they were.
    """
    out_dir = Path(out_dir)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        with writing(tmp_dir, "the Hugging Face files of"):
            write_hf_files(checkpointer, tmp_dir, model_state, adapter_state, adapter_config)
        if recipe_state is not None:
            torch_save(recipe_state, tmp_dir / RECIPE_STATE_FILE)
        write_manifest(tmp_dir, run=(recipe_state or {}).get("run"))
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
    return out_dir


def write_hf_files(
    checkpointer: Any,
    directory: Path,
    model_state: dict[str, torch.Tensor] | None,
    adapter_state: dict[str, torch.Tensor] | None = None,
    adapter_config: dict[str, Any] | None = None,
) -> None:
    """Write the model in Hugging Face layout into ``directory`` (created if needed) with torchtune's HF
    ``checkpointer`` (a ``FullModelHFCheckpointer`` whose ``load_checkpoint`` has run: it learns the source's
    sharding then), and the adapter in PEFT layout under ``adapter/``. ``model_state`` None writes the adapter
    alone. No manifest: the caller writes it once, when the directory is whole."""
    state: dict[str, Any] = {training.MODEL_KEY: model_state or {}}
    vision = checkpointer._model_type.name == "LLAMA3_VISION"  # torchtune writes its adapter in its own names only
    if adapter_state is not None:
        state[training.ADAPTER_KEY] = adapter_state if vision else _rows_for_torchtune_peft_export(adapter_state,
                                                                                                  checkpointer)
        state[training.ADAPTER_CONFIG] = dict(adapter_config or {})
    saved_output_dir = checkpointer._output_dir
    checkpointer._output_dir = directory  # torchtune writes into <output_dir>/epoch_<n>/
    torchtune_log = logging.getLogger("torchtune.utils._logging")  # the logger all of torchtune logs to
    saved_level = torchtune_log.level
    torchtune_log.setLevel(logging.WARNING)  # its messages name the temporary directory; the caller logs the real one
    try:
        checkpointer.save_checkpoint(state, epoch=0, intermediate_checkpoint=False, adapter_only=model_state is None)
    finally:
        checkpointer._output_dir = saved_output_dir
        torchtune_log.setLevel(saved_level)
    written = directory / "epoch_0"
    for path in list(written.iterdir()):
        path.rename(directory / path.name)
    written.rmdir()
    (directory / "adapter_model.pt").unlink(missing_ok=True)  # a pickle; the safetensors copy is the adapter
    if adapter_state is not None:
        (directory / ADAPTER_DIR).mkdir()
        if (directory / PEFT_FILES[0]).exists():
            for name in PEFT_FILES:
                (directory / name).rename(directory / ADAPTER_DIR / name)
        else:  # Phi-3/Phi-4, Llama 3.2 Vision: torchtune has no PEFT export. torchtune's names, for resume
            save_file(adapter_state, directory / ADAPTER_DIR / TUNE_ADAPTER_FILE)
            if not (adapter_config or {}).get("use_dora"):  # and ours, for peft (LoRA; DoRA is not exported)
                export = mllama_peft_adapter if vision else fused_peft_adapter
                weights, peft_config = export(adapter_state, dict(adapter_config or {}), checkpointer._config)
                save_file(weights, directory / ADAPTER_DIR / PEFT_FILES[0], metadata={"format": "pt"})
                (directory / ADAPTER_DIR / PEFT_FILES[1]).write_text(json.dumps(peft_config, indent=2) + "\n")


def save_lora_checkpoint(
    checkpointer: Any, out_dir: Path, model: nn.Module, lora: dict[str, Any], dtype: torch.dtype, recipe_state: dict
) -> Path:
    """A LoRA checkpoint: the merged model, the PEFT adapter and its config, and the recipe state."""
    return save_checkpoint_dir(
        checkpointer,
        out_dir,
        model_state=merged_lora_state_dict(model, lora["rank"], lora["alpha"], dtype),
        adapter_state=adapter_state_dict(model),
        adapter_config=peft_adapter_config(lora),
        recipe_state=recipe_state,
    )
