"""Checks the recipes run on their config before building anything, so a bad config fails fast and says why."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torchtune import config
from torchtune.config._errors import InstantiationError

from dpo_components.losses import PreferenceLoss


class ConfigError(ValueError):
    """A config a recipe refuses, with what to change."""


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
    for key in ("dataset", "eval_dataset"):
        files = (optional_component(cfg, key) or {}).get("data_files")
        paths += [files] if isinstance(files, str) else list(files or [])
    if not all(Path(p).exists() for p in paths):
        config.instantiate(node)


def instantiate_loss(cfg_loss: DictConfig) -> PreferenceLoss:
    """Build the loss from YAML; anything but a ``PreferenceLoss`` is refused with the config that was given."""
    try:
        loss = config.instantiate(cfg_loss)
    except (InstantiationError, ImportError, AttributeError, ValueError, TypeError) as error:
        raise ConfigError(f"cannot build loss {OmegaConf.to_container(cfg_loss)}: {error}") from error
    if not isinstance(loss, PreferenceLoss):
        raise ConfigError(f"loss must be a dpo_components.losses.PreferenceLoss, got {type(loss).__name__}")
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
