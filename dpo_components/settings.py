"""The recipes' shared settings, parsed and checked once: every shared key, its default and its check live here, so
the same mistake gets the same message in every recipe. Plus the checks a recipe runs on its inputs before building
anything, so a bad config fails fast and says why.

A recipe reads ``RecipeSettings.from_config(cfg)`` and then attributes (``settings.batch_size``); the components it
builds from YAML (model, tokenizer, dataset, loss, optimizer, LR schedule, metric logger) stay ``config.instantiate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils
from torchtune.config._errors import InstantiationError

from dpo_components.losses import PreferenceLoss


class ConfigError(ValueError):
    """A config a recipe refuses, with what to change."""


REFERENCE_MODES = ("model", "precomputed")
# the dtype the optimizer steps the trainable weights in (fp32 master copies under bf16 compute): see precision.py
DEFAULT_MASTER_DTYPE = "fp32"
ATTENTION_KERNELS = ("flex", "sdpa")  # prefix_sharing_attention: the kernel for shared rows on CUDA


@dataclass(frozen=True)
class ReferenceSettings:
    """The ``reference`` section: ``mode`` model (kept in memory, run every step) or precomputed (log-probs computed
    once and cached under ``cache_dir``, keyed by their inputs); ``batch_size`` of that pass; ``checkpointer``, a
    reference checkpoint other than the policy's start (recipes that support it)."""

    mode: str = "model"
    cache_dir: Path | None = None
    batch_size: int | None = None
    checkpointer: DictConfig | None = None


@dataclass(frozen=True)
class RecipeSettings:
    """The keys every recipe shares, with their defaults. Built by :meth:`from_config`, which checks them."""

    device: torch.device
    dtype: torch.dtype  # the compute dtype (and the dtype of the saved weights)
    output_dir: Path
    seed: int | None
    batch_size: int  # pairs per micro-batch (per rank in the FSDP2 recipes)
    gradient_accumulation_steps: int
    epochs: int
    max_steps_per_epoch: int | None = None  # null: whole epochs
    clip_grad_norm: float | None = None
    logprob_chunk_size: int = 256
    log_every_n_steps: int = 1
    eval_every_n_steps: int | None = None  # null: eval only at the end
    save_every_n_steps: int | None = None  # null: save only at the end
    shuffle: bool = True
    group_by_length: bool = False
    prefix_sharing: bool = False
    packing: bool = False  # the batch's pairs packed into rows, no padding between them (data/packing.py)
    packing_row_tokens: int | None = None  # the packed rows' budget; null: the model's max_seq_len
    # a step's batch_size x gradient_accumulation_steps pairs in micro-batches of at most this many computed tokens
    # (data/micro_batches.py); null: gradient_accumulation_steps micro-batches of batch_size pairs
    max_micro_batch_tokens: int | None = None
    flex_attention: bool = True  # prefix_sharing_attention: flex (default) or sdpa
    pad_to_multiple_of: int = 1
    compile: bool = False
    activation_checkpointing: bool = False  # enable_activation_checkpointing
    resume: bool = False  # resume_from_checkpoint
    overwrite_output_dir: bool = False
    reference: ReferenceSettings = ReferenceSettings()
    master_dtype: torch.dtype = torch.float32  # what the optimizer steps: fp32 master weights for bf16 compute
    quantize_base: bool = False  # model.quantize_base: an NF4 base (QLoRA)
    # the FSDP2 recipes
    consolidate_every_save: bool = False
    fsdp_reshard_after_forward: bool = True
    collective_timeout_seconds: int = 1800

    @classmethod
    def from_config(cls, cfg: DictConfig, reference_checkpointer: bool = True) -> RecipeSettings:
        """Read and check the shared keys of ``cfg``. ``reference_checkpointer`` False: the recipe's reference is
        the base model with adapters off, and a ``reference.checkpointer`` is refused rather than ignored."""
        device = utils.get_device(cfg.device)  # cuda: this process's LOCAL_RANK, as torchtune's recipes
        if str(cfg.device).startswith("cuda") and device.type != "cuda":  # torchtune falls back to the CPU silently
            raise ConfigError(f"device: {cfg.device}, but this machine has no CUDA GPU (torch {torch.__version__}: "
                              "torch.cuda.is_available() is False). Set device=cpu to run on the CPU (bf16 works "
                              "there too), or install a CUDA build of torch")  # fmt: skip
        dtype = training.get_dtype(cfg.dtype, device=device)  # refuses bf16 where unsupported
        if dtype == torch.float16:
            raise ConfigError("dtype fp16 is not supported (no loss scaling); use bf16 or fp32")
        master_dtype = training.get_dtype(cfg.get("master_dtype") or DEFAULT_MASTER_DTYPE, device=device)
        if master_dtype not in (torch.float32, dtype):
            raise ConfigError(f"master_dtype must be fp32 (fp32 master weights, the default) or the dtype "
                              f"({cfg.dtype}: the weights stepped in place), got {cfg.master_dtype}")  # fmt: skip
        check_positive(cfg, "batch_size", "gradient_accumulation_steps", "epochs")
        check_step_counts(cfg)
        if cfg.get("group_by_length", False) and not cfg.get("shuffle", True):
            raise ConfigError("group_by_length: true needs shuffle: true (the groups are drawn from a shuffled order)")
        budget = cfg.get("max_micro_batch_tokens")
        if budget is not None and not (isinstance(budget, int) and not isinstance(budget, bool) and budget > 0):
            raise ConfigError(f"max_micro_batch_tokens must be a positive integer or null, got {budget}")
        attention = cfg.get("prefix_sharing_attention", "flex")
        if attention not in ATTENTION_KERNELS:
            raise ConfigError(f"prefix_sharing_attention must be one of {ATTENTION_KERNELS}, got '{attention}'")
        return cls(
            device=device, dtype=dtype, output_dir=Path(cfg.output_dir), seed=cfg.get("seed"),
            batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps, epochs=cfg.epochs,
            max_steps_per_epoch=cfg.get("max_steps_per_epoch"), clip_grad_norm=cfg.get("clip_grad_norm"),
            logprob_chunk_size=cfg.get("logprob_chunk_size", 256), log_every_n_steps=cfg.get("log_every_n_steps", 1),
            eval_every_n_steps=cfg.get("eval_every_n_steps"), save_every_n_steps=cfg.get("save_every_n_steps"),
            shuffle=cfg.get("shuffle", True), group_by_length=cfg.get("group_by_length", False),
            prefix_sharing=cfg.get("prefix_sharing", False), flex_attention=attention == "flex",
            packing=cfg.get("packing", False), packing_row_tokens=cfg.get("packing_row_tokens"),
            max_micro_batch_tokens=cfg.get("max_micro_batch_tokens"),
            pad_to_multiple_of=cfg.get("pad_to_multiple_of", 1), compile=cfg.get("compile", False),
            activation_checkpointing=cfg.get("enable_activation_checkpointing", False),
            resume=cfg.get("resume_from_checkpoint", False),
            overwrite_output_dir=cfg.get("overwrite_output_dir", False),
            reference=_reference_settings(cfg, reference_checkpointer), master_dtype=master_dtype,
            quantize_base=bool(cfg.model.get("quantize_base", False)) if cfg.get("model") else False,
            consolidate_every_save=cfg.get("consolidate_every_save", False),
            fsdp_reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
            collective_timeout_seconds=cfg.get("collective_timeout_seconds", 1800),
        )  # fmt: skip

    def steps_per_epoch(self, num_pairs: int, world_size: int = 1) -> int:
        """Optimizer steps in one epoch over ``num_pairs``: whole global batches, at most ``max_steps_per_epoch``."""
        steps = num_pairs // (self.batch_size * world_size * self.gradient_accumulation_steps)
        return steps if self.max_steps_per_epoch is None else min(steps, self.max_steps_per_epoch)


def _reference_settings(cfg: DictConfig, checkpointer_allowed: bool) -> ReferenceSettings:
    node = cfg.get("reference") or {}
    mode = node.get("mode", "model")
    if mode not in REFERENCE_MODES:
        raise ConfigError(f"reference.mode must be one of {REFERENCE_MODES}, got '{mode}'")
    checkpointer = node.get("checkpointer") or None
    if checkpointer is not None and not checkpointer_allowed:
        raise ConfigError("reference.checkpointer is not supported by this recipe: its reference is the base model "
                          "with the adapters off. Set reference.checkpointer=null, or use recipes/ipo_single_device.py "
                          "(LoRA or full, any loss), which takes a separate reference checkpoint")  # fmt: skip
    cache_dir = node.get("cache_dir")
    cache_dir = Path(cache_dir or Path(cfg.output_dir) / "reference_cache")
    batch_size = node.get("batch_size") or cfg.batch_size
    return ReferenceSettings(mode=mode, cache_dir=cache_dir, batch_size=batch_size, checkpointer=checkpointer)


def prepare_and_check_inputs(cfg: DictConfig) -> None:
    """Run the config's ``prepare`` step if what it builds is missing (:func:`prepare_missing_inputs`), then check
    that the checkpoint files the config names exist (:func:`check_checkpoint_paths`, the reference's too)."""
    prepare_missing_inputs(cfg)
    check_checkpoint_paths(cfg.checkpointer, cfg.output_dir)
    if OmegaConf.select(cfg, "reference.checkpointer", default=None):
        check_checkpoint_paths(cfg.reference.checkpointer, cfg.output_dir, key="reference.checkpointer")


def check_datasets(settings: RecipeSettings, train_data: Any, eval_data: Any, world_size: int = 1) -> None:
    """The train set holds at least one step's pairs, and periodic eval has an eval set."""
    if settings.eval_every_n_steps and eval_data is None:
        raise ConfigError("eval_every_n_steps is set but there is no eval_dataset")
    step = settings.batch_size * world_size * settings.gradient_accumulation_steps
    if len(train_data) < step:
        ranks = " x world size" if world_size > 1 else ""
        raise ConfigError(f"the dataset has {len(train_data)} pairs, fewer than one step's batch_size{ranks} x "
                          f"gradient_accumulation_steps = {step}")  # fmt: skip


def check_checkpoint_paths(cfg_checkpointer: DictConfig, output_dir: str | Path, key: str = "checkpointer") -> None:
    """The checkpoint directory and files exist, and ``output_dir`` is not inside the checkpoint directory."""
    ckpt_dir = Path(cfg_checkpointer.checkpoint_dir)
    if not ckpt_dir.is_dir():
        raise ConfigError(f"{key}.checkpoint_dir {ckpt_dir} does not exist (download the model first)")
    missing = [f for f in cfg_checkpointer.checkpoint_files if not (ckpt_dir / f).is_file()]
    if missing:
        raise ConfigError(f"{key}.checkpoint_files not found in {ckpt_dir}: {missing}")
    output_dir = Path(output_dir).resolve()
    if output_dir == ckpt_dir.resolve() or ckpt_dir.resolve() in output_dir.parents:
        raise ConfigError(f"output_dir {output_dir} must not be inside {key}.checkpoint_dir {ckpt_dir}")


def prepare_missing_inputs(cfg: DictConfig) -> None:
    """Run the config's ``prepare`` step when the checkpoint directory or a data file it names is missing.

    The tiny configs name ``dpo_components.tiny.prepare.prepare_tiny`` there, so they run on a fresh clone: the
    first run builds the SFT'd tiny model and the synthetic data (about a minute), later runs reuse them.
    """
    node = optional_component(cfg, "prepare")
    if node is None:
        return
    paths = [cfg.checkpointer.checkpoint_dir]
    for key in ("dataset", "eval_dataset", "prompt_dataset"):
        files = (optional_component(cfg, key) or {}).get("data_files")
        paths += [files] if isinstance(files, str) else list(files or [])
    if not all(Path(p).exists() for p in paths):
        config.instantiate(node)


def instantiate_loss(cfg_loss: DictConfig, settings: RecipeSettings | None = None) -> PreferenceLoss:
    """Build the loss from YAML; anything but a ``PreferenceLoss`` is refused with the config that was given, and
    (given the ``settings``) a batch-coupled loss with ``max_micro_batch_tokens``, whose uneven micro-batches would
    change it."""
    try:
        loss = config.instantiate(cfg_loss)
    except (InstantiationError, ImportError, AttributeError, ValueError, TypeError) as error:
        raise ConfigError(f"cannot build loss {OmegaConf.to_container(cfg_loss)}: {error}") from error
    if not isinstance(loss, PreferenceLoss):
        raise ConfigError(f"loss must be a dpo_components.losses.PreferenceLoss, got {type(loss).__name__}")
    if settings is not None and settings.max_micro_batch_tokens is not None and loss.batch_coupled:
        raise ConfigError(f"max_micro_batch_tokens is not supported with {type(loss).__name__}: a row's loss "
                          "depends on the other rows of its micro-batch (AOT sorts them; KTO's z0 and the unpaired "
                          "losses' KL completions come from them), and micro-batches by tokens have uneven sizes "
                          "that follow the pairs' lengths. Set max_micro_batch_tokens=null and size the "
                          "micro-batch with batch_size")  # fmt: skip
    return loss


def check_positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[key]}")


# Step counts a recipe reads, and what null means for each (absent from the dict: null is not allowed).
_STEP_KEYS = {"log_every_n_steps": None, "eval_every_n_steps": "no eval during training",
              "save_every_n_steps": "save only at the end", "max_steps_per_epoch": "whole epochs"}  # fmt: skip


def check_step_counts(cfg: DictConfig) -> None:
    """Logging, eval and save intervals and ``max_steps_per_epoch`` are whole numbers >= 1 (or null where null
    has a meaning), so none of 0 (a division by zero, an untrained step_0) or -1 (every step) gets through."""
    for key, null_means in _STEP_KEYS.items():
        value = cfg.get(key, 1 if null_means is None else None)
        if value is None and null_means is not None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            allowed = f" or null ({null_means})" if null_means else ""
            raise ConfigError(f"{key} must be a whole number >= 1{allowed}, got {value!r}")


def optional_component(cfg: DictConfig, key: str) -> DictConfig | None:
    """``cfg[key]`` if it names a component, else None. On torchtune's command line ``key=null`` on a component
    node sets its ``_component_`` to null (and ``~key`` is refused), so both spellings mean "none"."""
    node = cfg.get(key)
    if node is None or (OmegaConf.is_dict(node) and node.get("_component_") is None):
        return None
    return node
