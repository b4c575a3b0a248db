"""The data a recipe trains and evaluates on, built from its config in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from omegaconf import DictConfig
from torchtune import config
from torchtune.utils import get_logger

from dpo_components.data.collate import PreferenceCollator, make_collator
from dpo_components.data.dataset import PreferenceDataset
from dpo_components.data.micro_batches import check_pairs_fit_budget, plan_micro_batches
from dpo_components.files import write_json
from dpo_components.losses import PreferenceLoss
from dpo_components.settings import ConfigError, RecipeSettings, check_datasets, optional_component
from dpo_components.vision.collate import VisionPreferenceCollator
from dpo_components.vision.data import VisionPreferenceDataset

log = get_logger("INFO")


@dataclass
class RecipeData:
    """The train pairs, the held-out pairs (or None), the collator for both, and how a train step's pairs are split
    into micro-batches (``batch_size`` pairs each, or by ``max_micro_batch_tokens``)."""

    train: PreferenceDataset
    eval: PreferenceDataset | None
    collate: PreferenceCollator | VisionPreferenceCollator
    batch_size: int = 1
    max_micro_batch_tokens: int | None = None

    def splits(self) -> dict[str, PreferenceDataset | None]:
        return {"train": self.train, "eval": self.eval}

    def micro_batches(self, samples: list[dict[str, Any]]) -> list[list[int]]:
        """One step's ``samples`` (batch_size x gradient_accumulation_steps pairs) as micro-batches of indices
        into them (:func:`dpo_components.data.micro_batches.plan_micro_batches`)."""
        return plan_micro_batches(samples, self.batch_size, self.max_micro_batch_tokens, self.collate)


def load_recipe_data(
    cfg: DictConfig,
    settings: RecipeSettings,
    tokenizer: Any,
    max_seq_len: int,
    world_size: int = 1,
    loss: PreferenceLoss | None = None,
) -> RecipeData:
    """``dataset`` and ``eval_dataset`` (optional; ``eval_dataset=null`` turns it off) tokenized with
    ``tokenizer``; refuses a train set smaller than one step and periodic eval without an eval set, and names a
    pair whose row does not fit ``max_seq_len`` in the batch layout the settings choose. Given the ``loss``, also
    refuses data of the other kind (pairs for KTO, unpaired rows for a pairwise loss) before anything long runs,
    and for unpaired rows logs the class counts and warns when the weighted classes are unbalanced."""
    train = config.instantiate(cfg.dataset, tokenizer)
    eval_cfg = optional_component(cfg, "eval_dataset")
    held_out = config.instantiate(eval_cfg, tokenizer) if eval_cfg else None
    write_data_report(settings.output_dir, dataset=train, eval_dataset=held_out)
    if loss is not None:
        check_data_kind(loss, dataset=train, eval_dataset=held_out)
    check_datasets(settings, train, held_out, world_size)
    with_images = [isinstance(data, VisionPreferenceDataset) for data in (train, held_out) if data is not None]
    if any(with_images) and settings.packing:
        raise ConfigError("packing does not hold images yet: set packing=false for image-grounded pairs "
                          "(prefix_sharing works with them)")  # fmt: skip
    if any(with_images) and not all(with_images):
        raise ConfigError("dataset and eval_dataset must both hold image-grounded pairs or both text pairs: build "
                          "both with dpo_components.vision.vision_preference_dataset, or neither")  # fmt: skip
    # the batches of image-grounded pairs carry each pair's images once (dpo_components.vision.collate)
    collate = make_collator(tokenizer.pad_id, max_seq_len, settings.pad_to_multiple_of, settings.prefix_sharing,
                            datasets={"dataset": train, "eval_dataset": held_out}, packing=settings.packing,
                            packing_row_tokens=settings.packing_row_tokens)  # fmt: skip
    if settings.max_micro_batch_tokens is not None:  # a batch-coupled loss is refused by instantiate_loss
        check_pairs_fit_budget(settings.max_micro_batch_tokens, collate, dataset=train)
        log.info(f"micro-batches by tokens: each step's {settings.batch_size * settings.gradient_accumulation_steps} "
                 f"pairs{' per rank' if world_size > 1 else ''} in micro-batches of at most "
                 f"{settings.max_micro_batch_tokens} computed positions")  # fmt: skip
    return RecipeData(train, held_out, collate, settings.batch_size, settings.max_micro_batch_tokens)


def write_data_report(output_dir: Path, **datasets: Any) -> None:
    """Log each dataset's report (by config key; None skipped) and write them to ``output_dir/data_report.json``
    (rank 0): rows read / kept / skipped by reason, what ``max_length`` cut, trained tokens per response
    (:mod:`dpo_components.data.report`)."""
    reports = {key: data.report for key, data in datasets.items() if getattr(data, "report", None) is not None}
    for key, report in reports.items():
        log.info(f"data report ({key}):")
        report.log(log)
    if reports and (not dist.is_initialized() or dist.get_rank() == 0):
        write_json(Path(output_dir) / "data_report.json", {key: r.to_dict() for key, r in reports.items()},
                   "the data report")  # fmt: skip


def check_data_kind(loss: PreferenceLoss, **datasets: Any) -> None:
    """Each dataset (by config key; None skipped) holds what ``loss`` trains on (``data_kind``: pairs or unpaired
    rows); for unpaired training data, the class counts are logged and :meth:`class_balance_warning` warned."""
    for key, data in datasets.items():
        kind = getattr(data, "data_kind", "pairs")
        if data is None or kind == loss.data_kind:
            continue
        if loss.data_kind == "unpaired":
            raise ConfigError(
                f"{key}: {type(loss).__name__} trains on unpaired rows (prompt, completion, label) but {key} holds "
                f"preference pairs; set {key}._component_=dpo_components.data.unpaired_dataset (it reads unpaired "
                "rows and unrolls pairs into them)"
            )
        raise ConfigError(
            f"{key}: {type(loss).__name__} trains on preference pairs but {key} holds unpaired rows ({data.source}); "
            "use an unpaired loss (loss._component_=dpo_components.losses.KTOLoss) or a preference dataset"
        )
    train = datasets.get("dataset")
    if loss.data_kind == "unpaired" and train is not None:
        log.info(f"{train.source}: {train.desirable_count} desirable and {train.undesirable_count} undesirable rows")
        warning = loss.class_balance_warning(train.desirable_count, train.undesirable_count)
        if warning:
            log.warning(warning)
