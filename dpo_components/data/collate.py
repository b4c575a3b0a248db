"""Batches of preference pairs: the standard [2B, L] layout (chosen rows, then rejected), the recipe's collator
(standard, prefix-shared or packed rows), and the check that every row fits the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from dpo_components.data.dataset import IGNORE_INDEX, PreferenceDataset, desirable_of
from dpo_components.data.packing import check_documents_fit, collate_packed, documents_of, pack_rows
from dpo_components.data.prefix_sharing import check_fits, collate_prefix_shared
from dpo_components.data.segments import PADDING


def collate_preference_batch(
    batch: list[dict[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = IGNORE_INDEX,
    pad_to_multiple_of: int = 1,
) -> dict[str, torch.Tensor]:
    """Pad B pairs into one [2B, L] batch for a single concatenated forward: chosen rows first, then rejected.

    Returns ``input_ids`` and ``labels`` (right-padded with ``padding_idx`` / ``ignore_idx``; prompt positions
    are ``ignore_idx`` in ``labels``), ``lengths`` [2B] (tokens before padding) and ``index`` [B], the samples'
    dataset indices; for unpaired rows (KTO) also ``desirable`` [B].
    ``pad_to_multiple_of`` rounds L up (fewer distinct shapes for ``torch.compile``).
    """
    inputs, labels = [], []
    for side in ("chosen", "rejected"):
        for sample in batch:
            prompt = sample["prompt_ids"]
            inputs.append(torch.tensor(prompt + sample[f"{side}_response_ids"]))
            labels.append(torch.tensor([ignore_idx] * len(prompt) + sample[f"{side}_labels"]))
    input_ids = pad_sequence(inputs, batch_first=True, padding_value=padding_idx)
    label_ids = pad_sequence(labels, batch_first=True, padding_value=ignore_idx)
    extra = -input_ids.shape[1] % pad_to_multiple_of
    if extra:
        input_ids = torch.nn.functional.pad(input_ids, (0, extra), value=padding_idx)
        label_ids = torch.nn.functional.pad(label_ids, (0, extra), value=ignore_idx)
    index = torch.tensor([sample["index"] for sample in batch])
    lengths = torch.tensor([len(row) for row in inputs])
    return {"input_ids": input_ids, "labels": label_ids, "lengths": lengths, "index": index, **desirable_of(batch)}


@dataclass(frozen=True)
class PreferenceCollator:
    """The batch collator a recipe uses: standard [2B, L] rows, shared [prompt | chosen | rejected] rows
    (``prefix_sharing``), or the same pairs' documents packed into rows of at most ``packing_row_tokens``
    (``packing``, :mod:`dpo_components.data.packing`; None: the longest document)."""

    padding_idx: int
    pad_to_multiple_of: int = 1
    prefix_sharing: bool = False
    packing: bool = False
    packing_row_tokens: int | None = None

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Tensor]:
        if self.packing:
            return collate_packed(batch, padding_idx=self.padding_idx, pad_to_multiple_of=self.pad_to_multiple_of,
                                  share_prompt=self.prefix_sharing, row_tokens=self.packing_row_tokens)  # fmt: skip
        collate = collate_prefix_shared if self.prefix_sharing else collate_preference_batch
        return collate(batch, padding_idx=self.padding_idx, pad_to_multiple_of=self.pad_to_multiple_of)

    def data_positions(self, batch: list[dict[str, Any]]) -> int:
        """The positions that hold data in the batch this collator makes of ``batch`` (the first number of
        :func:`batch_positions`): a sum over its pairs, and never more than :meth:`computed_positions`."""
        if self.packing:
            return sum(n for sample in batch for n in documents_of(sample, self.prefix_sharing))
        prompts = 1 if self.prefix_sharing else 2
        return sum(prompts * len(sample["prompt_ids"]) + len(sample["chosen_response_ids"])
                   + len(sample["rejected_response_ids"]) for sample in batch)  # fmt: skip

    def computed_positions(self, batch: list[dict[str, Any]]) -> int:
        """Rows x length of the batch this collator makes of ``batch``, padding included (the second number of
        :func:`batch_positions`), counted without building it: what a forward over it computes."""
        def padded(length: int) -> int:
            return length + (-length % self.pad_to_multiple_of)

        if self.packing:
            lengths = [n for sample in batch for n in documents_of(sample, self.prefix_sharing)]
            rows = pack_rows(lengths, self.packing_row_tokens or max(lengths))
            return len(rows) * padded(max(sum(lengths[d] for d in row) for row in rows))
        # one [prompt | chosen | rejected] row per pair, or a [prompt | chosen] and a [prompt | rejected] row
        rows_per_pair, longest = (1, sum) if self.prefix_sharing else (2, max)
        return rows_per_pair * len(batch) * padded(max(longest(documents_of(sample, self.prefix_sharing))
                                                       for sample in batch))  # fmt: skip


def preference_collator(
    padding_idx: int,
    pad_to_multiple_of: int = 1,
    prefix_sharing: bool = False,
    packing: bool = False,
    packing_row_tokens: int | None = None,
) -> PreferenceCollator:
    """The batch collator a recipe uses (:class:`PreferenceCollator`)."""
    return PreferenceCollator(padding_idx, pad_to_multiple_of, prefix_sharing, packing, packing_row_tokens)


def make_collator(
    padding_idx: int,
    max_seq_len: int,
    pad_to_multiple_of: int = 1,
    prefix_sharing: bool = False,
    datasets: dict[str, PreferenceDataset | None] | None = None,
    packing: bool = False,
    packing_row_tokens: int | None = None,
) -> PreferenceCollator:
    """A recipe's collator (:func:`preference_collator`), after checking that every row of ``datasets`` (by config
    key; None is skipped) fits the model's ``max_seq_len`` in that layout, padding included: a pair too long is
    named at setup instead of crashing the step that draws it. Datasets of image-grounded pairs wrap it so that
    batches carry their images (``with_images``, :mod:`dpo_components.vision.collate`)."""
    if packing:
        check_documents_fit(max_seq_len, prefix_sharing, packing_row_tokens, **(datasets or {}))
    else:
        check = check_fits if prefix_sharing else check_rows_fit
        check(max_seq_len, pad_to_multiple_of, **(datasets or {}))
    row_tokens = packing_row_tokens or max_seq_len  # packing: rows up to the model's length by default
    collator = preference_collator(padding_idx, pad_to_multiple_of, prefix_sharing, packing, row_tokens)
    # image-grounded pairs (dpo_components.vision) add their images to the text batch, once per pair
    with_images = next((d.with_images for d in (datasets or {}).values() if hasattr(d, "with_images")), None)
    return with_images(collator) if with_images is not None else collator


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


def batch_positions(batch: dict[str, Tensor]) -> tuple[int, int]:
    """(token positions that hold data, positions computed) of a batch; the difference is padding."""
    if "segments" in batch:
        return int((batch["segments"] != PADDING).sum()), batch["segments"].numel()
    return int(batch["lengths"].sum()), batch["input_ids"].numel()
