"""Checkpoints in Hugging Face layout, written atomically, and read back for resume without pickle.

A checkpoint is one directory, ``<output_dir>/step_<N>/``:

    model-00001-of-0000K.safetensors + model.safetensors.index.json + config.json + tokenizer files
        the merged full model (base + LoRA), in HF key layout: ``transformers`` and vLLM load it as is;
    adapter/adapter_model.safetensors + adapter/adapter_config.json
        the LoRA adapter in PEFT layout (``PeftModel.from_pretrained(base, "step_<N>/adapter")``). In a folder of
        its own: ``transformers`` with ``peft`` installed loads an adapter it finds beside a model's weights on top
        of them, so next to the merged model it would be applied twice. Phi-3/Phi-4, whose HF q/k/v (and gate/up)
        projections are fused and which torchtune cannot export, get our export (:func:`fused_peft_adapter`; LoRA
        only, not DoRA) and ``adapter/adapter_model.torchtune.safetensors`` in torchtune's names, for resume;
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

import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune import training
from torchtune.modules.peft import get_adapter_state_dict, get_lora_module_names, get_merged_lora_ckpt

from dpo_components.config_checks import ConfigError
from dpo_components.data import PreferenceDataset
from dpo_components.training import rng_state, set_rng_state

RECIPE_STATE_FILE = "recipe_state.pt"
ADAPTER_DIR = "adapter"  # step_<N>/adapter/: the PEFT adapter (see the module docstring for why not beside the model)
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")
TUNE_ADAPTER_FILE = "adapter_model.torchtune.safetensors"  # families torchtune cannot convert to PEFT (Phi)
MANIFEST_FILE = "manifest.json"
# torchtune model types whose RoPE uses Hugging Face's half-split layout, so their q/k weights are converted without
# torchtune's interleaving permutation. torchtune 0.6.1's PEFT export gets the q/k rows of adapters wrong both ways:
# it permutes ``lora_B`` for every family (wrong for Qwen: logits 0.16 off in ``peft`` on the tiny Qwen2.5 when
# lora_B is not near zero) and never the DoRA magnitude (wrong for the permuted families: 0.45 off on the tiny
# Mistral). :func:`_rows_for_torchtune_peft_export` prepares the adapter so that its export comes out right.
HALF_SPLIT_ROPE = ("QWEN2", "PHI3_MINI", "PHI4")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_CHUNK = 8 << 20
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, or no complete one to resume from; the message says which and why."""


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


# ---------------------------------------------------------------------------------------------- content hashes


def file_digest(path: str | Path) -> str:
    """BLAKE2b of every byte of a file, read in 8 MiB chunks (about 0.5 GB/s per core): a same-size edit anywhere
    changes it."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)  # hashlib releases the GIL here: files hash in parallel threads
    return digest.hexdigest()


def _digests(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, max(len(paths), 1))) as pool:
        return list(pool.map(file_digest, paths))


def files_digest(directory: str | Path, names: list[str]) -> str:
    """One hash over the named files of ``directory`` (e.g. a model's safetensors shards), by name and content."""
    names = sorted(names)
    digest = hashlib.blake2b(digest_size=16)
    for name, file_hash in zip(names, _digests([Path(directory) / n for n in names])):
        digest.update(f"{name}:{file_hash};".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ the run fingerprint

# The config keys that shape a run (whole sections are flattened to dotted keys); a resume must match every one.
# Logging, eval, save intervals, compile, activation checkpointing and the log-prob chunk size are left out: they
# do not change what is trained.
FINGERPRINT_KEYS = ("model", "loss", "optimizer", "lr_scheduler", "model_transform", "dtype", "seed", "batch_size",
                    "gradient_accumulation_steps", "epochs", "max_steps_per_epoch", "clip_grad_norm", "shuffle",
                    "group_by_length", "prefix_sharing")  # fmt: skip


def run_fingerprint(cfg: DictConfig, train_data: PreferenceDataset, **values: Any) -> dict[str, Any]:
    """What a run was trained with, as flat ``{key: value}``: the :data:`FINGERPRINT_KEYS` of ``cfg``, the
    dataset's length limits, ``train_pairs`` and ``train_data`` (hash of the tokenized pairs), ``base_checkpoint``
    (hash of every byte of the checkpoint files) and ``reference_checkpoint`` where one is configured. ``values``
    add or replace entries (the seed actually drawn, the world size)."""
    fingerprint: dict[str, Any] = {}
    for key in FINGERPRINT_KEYS:
        _flatten(key, OmegaConf.select(cfg, key, default=None), fingerprint)
    for key, value in (cfg.get("dataset") or {}).items():
        if "length" in key:  # max_length, max_prompt_length: truncation, also inside the data hash
            fingerprint[f"dataset.{key}"] = value
    fingerprint["train_pairs"] = len(train_data)
    fingerprint["train_data"] = train_data.content_hash()
    fingerprint["base_checkpoint"] = files_digest(cfg.checkpointer.checkpoint_dir, cfg.checkpointer.checkpoint_files)
    reference = OmegaConf.select(cfg, "reference.checkpointer", default=None)
    if reference:
        fingerprint["reference_checkpoint"] = files_digest(reference.checkpoint_dir, reference.checkpoint_files)
    return {**fingerprint, **values}


def _flatten(key: str, value: Any, out: dict[str, Any]) -> None:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        for sub_key, sub_value in value.items():
            _flatten(f"{key}.{sub_key}", sub_value, out)
    else:
        out[key] = value


def check_same_run(checkpoint_dir: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse (``ConfigError``) to resume ``checkpoint_dir`` when the run's fingerprint differs, naming every key
    that differs with both values."""
    changed = []
    for key in sorted(set(saved) | set(current)):
        before, now = saved.get(key, "<not set>"), current.get(key, "<not set>")
        if before != now:
            changed.append(f"  {key}: {before!r} in the checkpoint, {now!r} now")
    if changed:
        raise ConfigError(
            f"cannot resume from {checkpoint_dir}: it was trained with other settings:\n"
            + "\n".join(changed)
            + "\nResume with the checkpoint's values, or start a fresh run (another output_dir, or "
            "overwrite_output_dir=true to delete this run's checkpoints)."
        )


# -------------------------------------------------------------------------------- output dir, manifest, resume


def step_dirs(output_dir: str | Path) -> list[Path]:
    """The ``step_<N>`` directories of ``output_dir``, newest (largest N) first."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("step_*") if (m := _STEP_DIR.match(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


def claim_output_dir(output_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """A run owns its ``output_dir``. A fresh run (not ``resume``) refuses one that holds another run's
    ``step_<N>`` checkpoints, since a later resume would continue from them; with ``overwrite`` it deletes them
    and that run's metric logs and samples (the content-keyed reference cache stays)."""
    old = step_dirs(output_dir)
    if resume or not old:
        return
    names = ", ".join(p.name for p in old[:5]) + (", ..." if len(old) > 5 else "")
    if not overwrite:
        raise ConfigError(
            f"output_dir {output_dir} holds checkpoints of an earlier run ({names}). Set "
            "resume_from_checkpoint=true to continue that run, overwrite_output_dir=true to delete them and start "
            "over, or choose another output_dir."
        )
    for path in old:
        shutil.rmtree(path)
    for pattern in ("log_*.txt", "events.out.tfevents.*", "samples.jsonl"):
        for path in Path(output_dir).rglob(pattern):
            path.unlink()
    log.warning("overwrite_output_dir: deleted the earlier run's checkpoints (%s) and logs in %s", names, output_dir)


def write_manifest(checkpoint_dir: str | Path, run: dict[str, Any] | None = None) -> None:
    """Record every file of ``checkpoint_dir`` (size and BLAKE2b) and the run's fingerprint in ``manifest.json``;
    call it last."""
    checkpoint_dir = Path(checkpoint_dir)
    files = sorted(p for p in checkpoint_dir.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = {p.relative_to(checkpoint_dir).as_posix(): {"bytes": p.stat().st_size, "blake2b": h}
               for p, h in zip(files, _digests(files))}  # fmt: skip
    tmp = checkpoint_dir / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps({"files": entries, "run": run}, indent=1) + "\n")
    os.replace(tmp, checkpoint_dir / MANIFEST_FILE)


def checkpoint_problem(checkpoint_dir: str | Path) -> str | None:
    """What is wrong with ``checkpoint_dir`` against its manifest (the first bad file), or None if it is complete."""
    checkpoint_dir = Path(checkpoint_dir)
    try:
        entries = json.loads((checkpoint_dir / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST_FILE} (an unfinished save, or a checkpoint of an older version)"
    except (ValueError, KeyError, TypeError) as error:
        return f"its {MANIFEST_FILE} is unreadable ({error})"
    if RECIPE_STATE_FILE not in entries:
        return f"it has no {RECIPE_STATE_FILE} (not a checkpoint to resume from)"
    for name, entry in entries.items():
        path = checkpoint_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
    for name, file_hash in zip(entries, _digests([checkpoint_dir / n for n in entries])):
        if file_hash != entries[name]["blake2b"]:
            return f"{name} does not match its hash in the manifest"
    return None


def checkpoint_fingerprint(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The fingerprint of the run that wrote ``checkpoint_dir``, from its manifest."""
    return json.loads((Path(checkpoint_dir) / MANIFEST_FILE).read_text())["run"] or {}


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete ``step_<N>`` of ``output_dir`` (its files match its manifest), or None. Each newer one
    that is not complete is skipped with a warning naming the bad file."""
    for path in step_dirs(output_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def resume_checkpoint(output_dir: str | Path) -> Path:
    """The checkpoint ``resume_from_checkpoint`` continues from: :func:`latest_checkpoint`; a ``ConfigError`` if
    there is none, a ``CheckpointError`` naming every checkpoint and what is wrong with it if none is complete."""
    path = latest_checkpoint(output_dir)
    if path is not None:
        return path
    problems = [f"  {p.name}: {checkpoint_problem(p)}" for p in step_dirs(output_dir)]
    if not problems:
        raise ConfigError(f"resume_from_checkpoint is true but {output_dir} holds no step_<N> checkpoint")
    raise CheckpointError(f"resume_from_checkpoint is true but no checkpoint in {output_dir} is complete:\n"
                          + "\n".join(problems))  # fmt: skip


def save_failed(path: Path, error: BaseException, last_good: Path | None) -> CheckpointError:
    """The one message a failed save ends a run with: what failed, where, and the checkpoint to resume from."""
    last = (f"the last good checkpoint is {last_good} (resume_from_checkpoint=true continues from it)"
            if last_good else "no checkpoint of this run was written before")  # fmt: skip
    return CheckpointError(f"could not write checkpoint {path} ({type(error).__name__}: {error}); nothing of it "
                           f"was kept, {last}")  # fmt: skip


def save_checkpoint_dir(
    checkpointer: Any,
    out_dir: str | Path,
    model_state: dict[str, torch.Tensor] | None,
    adapter_state: dict[str, torch.Tensor] | None = None,
    adapter_config: dict[str, Any] | None = None,
    recipe_state: dict[str, Any] | None = None,
) -> Path:
    """Write one checkpoint directory atomically with torchtune's HF checkpointer, manifest last; returns its path.

    ``checkpointer`` is a ``FullModelHFCheckpointer`` whose ``load_checkpoint`` has run (it learns the source's
    sharding then). ``model_state`` None writes the adapter alone. An existing ``out_dir`` is replaced. On a failure
    (disk full, ...) the temporary directory is removed and the error raised; ``out_dir`` and every other checkpoint
    stay as they were.
    """
    out_dir = Path(out_dir)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        _write_checkpoint(checkpointer, tmp_dir, model_state, adapter_state, adapter_config, recipe_state)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
    return out_dir


def _write_checkpoint(
    checkpointer: Any,
    tmp_dir: Path,
    model_state: dict[str, torch.Tensor] | None,
    adapter_state: dict[str, torch.Tensor] | None,
    adapter_config: dict[str, Any] | None,
    recipe_state: dict[str, Any] | None,
) -> None:
    state: dict[str, Any] = {training.MODEL_KEY: model_state or {}}
    if adapter_state is not None:
        state[training.ADAPTER_KEY] = _rows_for_torchtune_peft_export(adapter_state, checkpointer)
        state[training.ADAPTER_CONFIG] = dict(adapter_config or {})
    saved_output_dir = checkpointer._output_dir
    checkpointer._output_dir = tmp_dir  # torchtune writes into <output_dir>/epoch_<n>/
    torchtune_log = logging.getLogger("torchtune.utils._logging")  # the logger all of torchtune logs to
    saved_level = torchtune_log.level
    torchtune_log.setLevel(logging.WARNING)  # its messages name the temporary directory; the caller logs the real one
    try:
        checkpointer.save_checkpoint(state, epoch=0, intermediate_checkpoint=False, adapter_only=model_state is None)
    finally:
        checkpointer._output_dir = saved_output_dir
        torchtune_log.setLevel(saved_level)
    written = tmp_dir / "epoch_0"
    for path in list(written.iterdir()):
        path.rename(tmp_dir / path.name)
    written.rmdir()
    (tmp_dir / "adapter_model.pt").unlink(missing_ok=True)  # a pickle; the safetensors copy is the adapter
    if adapter_state is not None:
        (tmp_dir / ADAPTER_DIR).mkdir()
        if (tmp_dir / PEFT_FILES[0]).exists():
            for name in PEFT_FILES:
                (tmp_dir / name).rename(tmp_dir / ADAPTER_DIR / name)
        else:  # Phi-3/Phi-4: torchtune has no PEFT export (fused qkv_proj, gate_up_proj). torchtune's names, for resume
            save_file(adapter_state, tmp_dir / ADAPTER_DIR / TUNE_ADAPTER_FILE)
            if not (adapter_config or {}).get("use_dora"):  # and ours, for peft (LoRA; DoRA is not exported)
                weights, peft_config = fused_peft_adapter(
                    adapter_state, dict(adapter_config or {}), checkpointer._config
                )
                save_file(weights, tmp_dir / ADAPTER_DIR / PEFT_FILES[0], metadata={"format": "pt"})
                (tmp_dir / ADAPTER_DIR / PEFT_FILES[1]).write_text(json.dumps(peft_config, indent=2) + "\n")
    if recipe_state is not None:
        torch.save(recipe_state, tmp_dir / RECIPE_STATE_FILE)
    write_manifest(tmp_dir, run=(recipe_state or {}).get("run"))


def load_state_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` of a file the recipes wrote; an unreadable one is a ``CheckpointError``
    that names it."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read {path}: {type(error).__name__}: {str(error).splitlines()[0]}") from None


def load_recipe_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    return load_state_file(Path(checkpoint_dir) / RECIPE_STATE_FILE)


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


def peft_layout(checkpointer: Any) -> dict[str, Any]:
    """The arguments of :func:`load_peft_adapter` for a model loaded by the HF ``checkpointer``."""
    hf = checkpointer._config
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


def peft_adapter_config(lora: dict[str, Any]) -> dict[str, Any]:
    """``adapter_config.json`` for PEFT from :func:`lora_settings` (torchtune adds ``base_model_name_or_path``)."""
    return {
        "r": lora["rank"], "lora_alpha": lora["alpha"], "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "use_dora": lora["dora"], "bias": "none",
        "target_modules": get_lora_module_names(lora["attn_modules"], lora["mlp"], lora["output"]),
    }  # fmt: skip


def training_state(
    progress: dict[str, int], optimizer: torch.optim.Optimizer, lr_scheduler: Any, run: dict[str, Any]
) -> dict[str, Any]:
    """What an exact resume needs. ``progress``: global_step, epochs_run, batches_done_in_epoch. ``run``: the
    run's fingerprint (:func:`run_fingerprint`), checked on resume."""
    return {**progress, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
            "rng": rng_state(), "run": run}  # fmt: skip


def restore_training_state(
    checkpoint_dir: Path, optimizer: torch.optim.Optimizer, lr_scheduler: Any, run: dict[str, Any]
) -> dict[str, int]:
    """Load optimizer, LR schedule and RNG from ``checkpoint_dir``; return the progress counters.

    Refuses (``ConfigError``, naming each key) when the run's fingerprint ``run`` differs from the checkpoint's.
    """
    state = load_recipe_state(checkpoint_dir)
    check_same_run(checkpoint_dir, state["run"], run)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    set_rng_state(state["rng"])
    return {key: state[key] for key in ("global_step", "epochs_run", "batches_done_in_epoch")}
