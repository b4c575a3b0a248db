"""Training-loop pieces every DPO recipe shares: the concatenated forward, metrics, data order, RNG, memory.

They are small on purpose; the recipes call them from a plain loop that stays readable top to bottom.
"""

from __future__ import annotations

import random
import resource
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from dpo_components.data import PreferenceDataset, collate_preference_batch
from dpo_components.logprobs import sequence_logprobs
from dpo_components.losses import PreferenceLossOutput, SequenceLogProbs
from dpo_components.prefix_sharing import (
    PADDING,
    check_fits,
    collate_prefix_shared,
    packed_lengths,
    prefix_shared_logprobs,
    use_flex_attention,
)


def concatenated_logprobs(model: nn.Module, batch: dict[str, Tensor], chunk_size: int = 256) -> SequenceLogProbs:
    """One forward over the batch -> per-pair log-prob sums and counts. The batch is either the standard [2B, L]
    one (chosen rows, then rejected) or, with prefix sharing, B shared rows (``dpo_components.prefix_sharing``)."""
    if "segments" in batch:
        return prefix_shared_logprobs(model, batch, chunk_size)
    logps, tokens = sequence_logprobs(model, batch["input_ids"], batch["labels"], chunk_size=chunk_size)
    return SequenceLogProbs.from_concatenated(logps, tokens)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch), so a resumed run can
    rebuild it and skip exactly the batches it has already trained on."""
    if not shuffle:
        return list(range(num_samples))
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def preference_collator(padding_idx: int, pad_to_multiple_of: int = 1, prefix_sharing: bool = False) -> Callable:
    """The batch collator a recipe uses: standard [2B, L] rows, or shared [prompt | chosen | rejected] rows."""
    collate = collate_prefix_shared if prefix_sharing else collate_preference_batch
    return partial(collate, padding_idx=padding_idx, pad_to_multiple_of=pad_to_multiple_of)


def collator_from_config(cfg: Any, padding_idx: int, max_seq_len: int, **datasets: Any) -> Callable:
    """A recipe's collator from its config keys ``pad_to_multiple_of``, ``prefix_sharing`` and
    ``prefix_sharing_attention`` (``flex``, the default, or ``sdpa``: the kernel for shared rows on CUDA). With
    prefix sharing it checks that the shared rows of ``datasets`` (by name, None skipped) fit ``max_seq_len``."""
    pad_to_multiple_of = cfg.get("pad_to_multiple_of", 1)
    prefix_sharing = cfg.get("prefix_sharing", False)
    if prefix_sharing:
        use_flex_attention(cfg.get("prefix_sharing_attention", "flex") == "flex")
        check_fits(max_seq_len, pad_to_multiple_of, **datasets)
    else:
        check_rows_fit(max_seq_len, pad_to_multiple_of, **datasets)
    return preference_collator(padding_idx, pad_to_multiple_of, prefix_sharing)


def check_rows_fit(max_seq_len: int, pad_to_multiple_of: int = 1, **datasets: PreferenceDataset | None) -> None:
    """Refuse a dataset (by name; None is skipped) with a pair whose row, prompt + longer response padded up to
    ``pad_to_multiple_of``, is longer than the model's ``max_seq_len``: at setup, naming the first such pair,
    instead of a crash at the step that draws it."""
    for where, dataset in datasets.items():
        for i, length in enumerate(dataset.sample_lengths() if dataset is not None else []):
            padded = length + (-length % pad_to_multiple_of)
            if padded > max_seq_len:
                raise ValueError(
                    f"{where}: pair {i} ({dataset.source} row {dataset.row_numbers[i]}) needs {padded} tokens "
                    f"(prompt + longer response{', padded' if padded > length else ''}), more than the model's "
                    f"max_seq_len {max_seq_len}; lower {where}.max_length or raise the model's max_seq_len"
                )


def length_grouped_order(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_batches: int = 64
) -> list[int]:
    """An epoch's sample order whose consecutive ``batch_size`` chunks hold pairs of similar length.

    Shuffle, cut into groups of ``group_batches`` batches, sort each group by length, cut it into batches, then
    shuffle the batches (as Hugging Face's ``LengthGroupedSampler``, plus the batch shuffle so that the order of
    lengths within a group does not become a schedule). A leftover partial batch goes last, where ``drop_last``
    drops it. Depends only on (seed, epoch), so a resumed run rebuilds it.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    group = batch_size * group_batches
    batches = []
    for start in range(0, len(order), group):
        members = sorted(order[start : start + group], key=lambda i: lengths[i], reverse=True)
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    partial_batches = [b for b in batches if len(b) < batch_size]
    shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return [i for b in shuffled + partial_batches for i in b]


def batch_order(
    dataset: PreferenceDataset,
    seed: int,
    epoch: int,
    batch_size: int,
    shuffle: bool = True,
    group_by_length: bool = False,
    prefix_sharing: bool = False,
) -> list[int]:
    """The sample order of one epoch as the recipes draw it: :func:`epoch_order`, or with ``group_by_length``
    :func:`length_grouped_order` by the length of the rows the collator builds (shared rows with prefix sharing)."""
    if not group_by_length:
        return epoch_order(len(dataset), seed, epoch, shuffle)
    lengths = packed_lengths(dataset) if prefix_sharing else dataset.sample_lengths()
    return length_grouped_order(lengths, batch_size, seed, epoch)


def batch_positions(batch: dict[str, Tensor]) -> tuple[int, int]:
    """(token positions that hold data, positions computed) of a batch; the difference is padding."""
    if "segments" in batch:
        return int((batch["segments"] != PADDING).sum()), batch["segments"].numel()
    return int(batch["lengths"].sum()), batch["input_ids"].numel()


class PreferenceMetrics:
    """Accumulates per-pair DPO metrics over the micro-batches of a step (or an eval pass) and averages them.

    Names follow TRL and torchtune: loss, rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}.
    Accuracy counts a tie (margin exactly 0, e.g. before any training) as half right, not as wrong.
    Given the batches, it also counts ``tokens`` (prompt + response of both sides, without padding: the same
    count in the standard and the prefix-shared layout) and logs ``padding_fraction``, the share of computed
    positions that were padding.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.pairs = 0
        self.tokens = 0
        self.data_positions = self.computed_positions = 0

    def update(
        self, out: PreferenceLossOutput, policy: SequenceLogProbs, batch: dict[str, Tensor] | None = None
    ) -> None:
        margins = out.chosen_rewards - out.rejected_rewards
        accuracies = (margins > 0).float() + 0.5 * (margins == 0).float()
        values = {
            "loss": out.losses.detach(),
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/margins": margins,
            "rewards/accuracies": accuracies,
            "logps/chosen": policy.chosen_logps.detach(),
            "logps/rejected": policy.rejected_logps.detach(),
            **out.metrics,  # loss-specific, e.g. ipo/margin
        }
        stacked = torch.stack([v.float().sum() for v in values.values()]).tolist()  # one device sync
        for name, total in zip(values, stacked):
            self.sums[name] = self.sums.get(name, 0.0) + total
        self.pairs += out.losses.shape[0]
        if batch is not None:
            self.tokens += int(batch["lengths"].sum())
            data, computed = batch_positions(batch)
            self.data_positions += data
            self.computed_positions += computed

    def compute(self) -> dict[str, float]:
        results = {name: total / max(self.pairs, 1) for name, total in self.sums.items()}
        if self.computed_positions:
            results["padding_fraction"] = 1 - self.data_positions / self.computed_positions
        return results


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


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
