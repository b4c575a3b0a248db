"""The data a recipe trains and evaluates on, built from its config in one place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig
from torchtune import config

from dpo_components.data.collate import make_collator
from dpo_components.data.dataset import PreferenceDataset
from dpo_components.settings import RecipeSettings, check_datasets, optional_component


@dataclass
class RecipeData:
    """The train pairs, the held-out pairs (or None) and the collator for both."""

    train: PreferenceDataset
    eval: PreferenceDataset | None
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def splits(self) -> dict[str, PreferenceDataset | None]:
        return {"train": self.train, "eval": self.eval}


def load_recipe_data(
    cfg: DictConfig, settings: RecipeSettings, tokenizer: Any, max_seq_len: int, world_size: int = 1
) -> RecipeData:
    """``dataset`` and ``eval_dataset`` (optional; ``eval_dataset=null`` turns it off) tokenized with
    ``tokenizer``; refuses a train set smaller than one step and periodic eval without an eval set, and names a
    pair whose row does not fit ``max_seq_len`` in the batch layout the settings choose."""
    train = config.instantiate(cfg.dataset, tokenizer)
    eval_cfg = optional_component(cfg, "eval_dataset")
    held_out = config.instantiate(eval_cfg, tokenizer) if eval_cfg else None
    check_datasets(settings, train, held_out, world_size)
    collate = make_collator(tokenizer.pad_id, max_seq_len, settings.pad_to_multiple_of, settings.prefix_sharing,
                            datasets={"dataset": train, "eval_dataset": held_out})  # fmt: skip
    return RecipeData(train, held_out, collate)
