"""Packing: the sequences of a batch's pairs laid end to end in a few rows, with no padding between them.

A batch of B pairs in the standard layout is 2B rows padded to the longest; with random order about a quarter of
the computed tokens are padding. ``packing: true`` keeps the batch (the same B pairs, so data order, loss,
normalisation, gradient accumulation, resume and the reference cache are those of the unpacked run) and changes
only its layout: each pair's sequences are a *document*, and documents are placed into as few rows of at most
``row_tokens`` tokens as their total needs, filled evenly (:func:`pack_rows`). Each document restarts its RoPE
positions at 0 and attends only within itself:

    document    [prompt | chosen], [prompt | rejected]        (packing without prefix sharing: two documents)
                [prompt | chosen | rejected]                  (with prefix sharing: one, the prompt once)

    allowed(q, k) = k <= q and document[k] == document[q] and (segment[k] == segment[q] or
                    (segment[k] == PROMPT and segment[q] != PADDING))

(the prefix-sharing mask of :mod:`dpo_components.models.attention_masks` within one document). So every response
token sees exactly the tokens and positions it sees unpacked, and per-pair log-probs and gradients equal the
standard path's up to float rounding (``tests/components/test_packing.py``).

The recipes' ``packing_row_tokens`` (null: the model's ``max_seq_len``) is the row budget. Longer rows leave less
padding but cost more attention where the mask is dense: on CPU it is a [rows, L, L] boolean for SDPA, which
computes the masked scores too; on CUDA a FlexAttention ``BlockMask`` skips the fully masked blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dpo_components.data.dataset import IGNORE_INDEX, PreferenceDataset, desirable_of
from dpo_components.data.segments import CHOSEN, PADDING, PROMPT, REJECTED

# the documents of one pair, as the parts each holds in order: one with prefix sharing, else one per response
DOCUMENTS = {True: [["prompt", "chosen", "rejected"]], False: [["prompt", "chosen"], ["prompt", "rejected"]]}


def _part_ids(sample: dict[str, Any], part: str) -> list[int]:
    return sample["prompt_ids"] if part == "prompt" else sample[f"{part}_response_ids"]


def documents_of(sample: dict[str, Any], share_prompt: bool) -> list[int]:
    """The lengths of one pair's documents, in order: [prompt + chosen + rejected] or [prompt + chosen, prompt +
    rejected]."""
    return [sum(len(_part_ids(sample, part)) for part in doc) for doc in DOCUMENTS[share_prompt]]


def document_lengths(dataset: PreferenceDataset, share_prompt: bool) -> list[int]:
    """The longest document of each pair of ``dataset``."""
    return [max(documents_of(dataset[i], share_prompt)) for i in range(len(dataset))]


def check_documents_fit(
    max_seq_len: int, share_prompt: bool, row_tokens: int | None, **datasets: PreferenceDataset | None
) -> None:
    """Refuse a row budget above the model's ``max_seq_len``, and a dataset (by config key; None is skipped)
    with a pair whose document does not fit one row, naming the pair."""
    limit = row_tokens or max_seq_len
    if row_tokens is not None and not 0 < row_tokens <= max_seq_len:
        raise ValueError(f"packing_row_tokens must be in [1, the model's max_seq_len {max_seq_len}], got {row_tokens}")
    for where, dataset in datasets.items():
        for i, length in enumerate(document_lengths(dataset, share_prompt) if dataset is not None else []):
            if length > limit:
                what = "prompt + chosen + rejected" if share_prompt else "prompt + longer response"
                key = "packing_row_tokens" if row_tokens else "the model's max_seq_len"
                raise ValueError(f"packing: pair {i} of {where} ({dataset.source} row {dataset.row_numbers[i]}) "
                                 f"needs {length} tokens ({what}), more than {key} {limit}")  # fmt: skip


def pack_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """Documents (by length) into rows of at most ``budget`` tokens: as few rows as the total needs, R =
    ceil(total / budget), filled evenly, since the batch is R x (fullest row) and the rest is padding. Each
    document, longest first (ties in order), goes to the row with the fewest tokens so far (LPT scheduling);
    then documents are moved or swapped out of the fullest row while that lowers it. If a row still exceeds the
    budget, again with R + 1 rows. Deterministic, so a resumed run packs a batch as the first run did."""
    if max(lengths) > budget:
        raise ValueError(f"packing: a document of {max(lengths)} tokens does not fit a row of {budget}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows = -(-sum(lengths) // budget)
    while True:
        bins: list[list[int]] = [[] for _ in range(rows)]
        for item in order:
            min(bins, key=lambda b: sum(lengths[i] for i in b)).append(item)
        _even_out(bins, lengths)
        if max(sum(lengths[i] for i in b) for b in bins) <= budget:
            return [b for b in bins if b]
        rows += 1


def _even_out(bins: list[list[int]], lengths: list[int]) -> None:
    """Lower the fullest bin by the best single move or swap with another bin, while one lowers it."""
    while True:
        fill = [sum(lengths[i] for i in b) for b in bins]
        full = max(range(len(bins)), key=lambda b: fill[b])
        best = None  # (new height of the two bins, other bin, item out of the fullest, item back or None)
        for other in range(len(bins)):
            if other == full:
                continue
            for i in bins[full]:
                for j in [None, *bins[other]]:
                    delta = lengths[i] - (lengths[j] if j is not None else 0)
                    if delta <= 0:
                        continue
                    height = max(fill[full] - delta, fill[other] + delta)
                    if height < fill[full] and (best is None or height < best[0]):
                        best = (height, other, i, j)
        if best is None:
            return
        _, other, i, j = best
        bins[full].remove(i)
        bins[other].append(i)
        if j is not None:
            bins[other].remove(j)
            bins[full].append(j)


def collate_packed(
    batch: list[dict[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = IGNORE_INDEX,
    pad_to_multiple_of: int = 1,
    share_prompt: bool = True,
    row_tokens: int | None = None,
) -> dict[str, Tensor]:
    """Pack B pairs into [R, L] rows (:func:`pack_rows` with the budget ``row_tokens``, or the longest document
    if None; L is the fullest row, rounded up to ``pad_to_multiple_of``).

    Returns, like :func:`dpo_components.data.prefix_sharing.collate_prefix_shared`, ``input_ids``, ``input_pos``,
    ``segments`` (PROMPT / CHOSEN / REJECTED / PADDING) and ``documents`` (per row 0, 1, ...; -1 for padding)
    [R, L]; the tokens to score as ``score_positions`` (flat index into [R, L] of the predicting position),
    ``score_targets`` and ``score_sequences`` (pair i's chosen response is sequence i, its rejected one B + i);
    ``lengths`` [2B] (prompt + response, the standard layout's), ``index`` [B] and, for unpaired rows,
    ``desirable`` [B].
    """
    n = len(batch)
    docs = [(i, parts) for i, sample in enumerate(batch) for parts in DOCUMENTS[share_prompt]]
    doc_lengths = [n for sample in batch for n in documents_of(sample, share_prompt)]
    rows = pack_rows(doc_lengths, row_tokens or max(doc_lengths))
    fullest = max(sum(doc_lengths[d] for d in members) for members in rows)
    length = fullest + (-fullest % pad_to_multiple_of)
    input_ids = torch.full((len(rows), length), padding_idx, dtype=torch.long)
    input_pos = torch.zeros((len(rows), length), dtype=torch.long)
    segments = torch.full((len(rows), length), PADDING, dtype=torch.long)
    documents = torch.full((len(rows), length), -1, dtype=torch.long)
    positions, targets, sequences = [], [], []
    lengths = torch.zeros(2 * n, dtype=torch.long)
    for row, members in enumerate(rows):
        start = 0
        for slot, d in enumerate(members):
            pair, parts = docs[d]
            sample = batch[pair]
            prompt = len(sample["prompt_ids"])
            if prompt == 0:
                raise ValueError(f"packing: pair {sample['index']} has an empty prompt")
            documents[row, start : start + doc_lengths[d]] = slot
            input_ids[row, start : start + prompt] = torch.tensor(sample["prompt_ids"])
            input_pos[row, start : start + prompt] = torch.arange(prompt)
            segments[row, start : start + prompt] = PROMPT
            last_prompt = row * length + start + prompt - 1
            at = start + prompt
            for part in parts[1:]:
                ids, labels = sample[f"{part}_response_ids"], torch.tensor(sample[f"{part}_labels"])
                end = at + len(ids)
                input_ids[row, at:end] = torch.tensor(ids)
                input_pos[row, at:end] = torch.arange(prompt, prompt + len(ids))
                segments[row, at:end] = CHOSEN if part == "chosen" else REJECTED
                # token k of the response is predicted at at + k - 1, except token 0: at the last prompt token
                predictors = torch.arange(row * length + at - 1, row * length + end - 1)
                predictors[0] = last_prompt
                scored = labels != ignore_idx
                sequence = pair if part == "chosen" else n + pair
                positions.append(predictors[scored])
                targets.append(labels[scored])
                sequences.append(torch.full((int(scored.sum()),), sequence, dtype=torch.long))
                lengths[sequence] = prompt + len(ids)
                at = end
            start += doc_lengths[d]
    return {
        "input_ids": input_ids, "input_pos": input_pos, "segments": segments, "documents": documents,
        "score_positions": torch.cat(positions), "score_targets": torch.cat(targets),
        "score_sequences": torch.cat(sequences), "lengths": lengths,
        "index": torch.tensor([sample["index"] for sample in batch]),
        **desirable_of(batch),
    }  # fmt: skip
