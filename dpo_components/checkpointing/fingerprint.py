"""The run's fingerprint: what a run was trained with (config keys that shape it, hashes of the base checkpoint and of
the tokenized data). A resume must match it key for key; every key that differs is named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dpo_components.checkpointing.directory import files_digest
from dpo_components.data import PreferenceDataset
from dpo_components.settings import DEFAULT_MASTER_DTYPE, ConfigError

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
    master_dtype = cfg.get("master_dtype") or DEFAULT_MASTER_DTYPE
    if master_dtype != cfg.get("dtype"):  # fp32 master copies of bf16 weights: another run than bf16 in place
        fingerprint["master_dtype"] = master_dtype
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
