"""``recipe_state.pt``: what an exact resume needs besides the weights (optimizer, LR schedule, step, data position,
RNG, the run's fingerprint), as tensors and plain Python values, read back with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from dpo_components.checkpointing.directory import RECIPE_STATE_FILE, CheckpointError
from dpo_components.checkpointing.fingerprint import check_same_run


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout, sampling), for an exact resume."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` of a file the recipes wrote; an unreadable one is a ``CheckpointError``
    that names it."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read {path}: {type(error).__name__}: {str(error).splitlines()[0]}") from None


def load_recipe_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    return load_state_file(Path(checkpoint_dir) / RECIPE_STATE_FILE)


def training_state(
    progress: dict[str, int],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    run: dict[str, Any],
    master_weights: Any = None,
) -> dict[str, Any]:
    """What an exact resume needs. ``progress``: global_step, epochs_run, batches_done_in_epoch. ``run``: the
    run's fingerprint (:func:`run_fingerprint`), checked on resume. ``master_weights``: the recipe's
    :class:`~dpo_components.precision.MasterWeights`, whose fp32 copies (if any) are saved here."""
    state = {**progress, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
             "rng": rng_state(), "run": run}  # fmt: skip
    if master_weights is not None and master_weights.has_copies:
        state["master_weights"] = master_weights.state_dict()
    return state


def restore_training_state(
    checkpoint_dir: Path,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    run: dict[str, Any],
    master_weights: Any = None,
) -> dict[str, int]:
    """Load optimizer, LR schedule, RNG and the fp32 master weights (into ``master_weights``, which writes them
    into the model) from ``checkpoint_dir``; return the progress counters.

    Refuses (``ConfigError``, naming each key) when the run's fingerprint ``run`` differs from the checkpoint's.
    """
    state = load_recipe_state(checkpoint_dir)
    check_same_run(checkpoint_dir, state["run"], run)
    if master_weights is not None:
        master_weights.load_state_dict(state.get("master_weights", {}), where=str(checkpoint_dir / RECIPE_STATE_FILE))
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    set_rng_state(state["rng"])
    return {key: state[key] for key in ("global_step", "epochs_run", "batches_done_in_epoch")}
