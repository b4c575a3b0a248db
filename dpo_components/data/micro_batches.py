"""A step's pairs into micro-batches: ``gradient_accumulation_steps`` of ``batch_size`` pairs each, or, with
``max_micro_batch_tokens``, as few as hold the step's pairs at that many computed tokens each.

A step is always its ``batch_size x gradient_accumulation_steps`` pairs, in the data order (so the step count, the
LR schedule, resume and what each step learns do not change with the budget). The budget only decides how they are
split for the forward and backward passes, so that a pass's memory follows its tokens rather than its pairs: with
random order, 32 pairs of 300 tokens and 32 of 1500 need very different memory, and the pair count that fits the
long ones leaves the short ones far from the machine's limit.

The step's loss is the mean over its N pairs however they are split into micro-batches m of n_m pairs:

    loss_step = (1 / N) sum_i loss_i = sum_m (n_m / N) mean_{i in m} loss_i

so each micro-batch's mean loss is weighted by n_m / N before its backward, and the step's gradient equals the
gradient of one pass over all N pairs up to float rounding (``tests/components/test_micro_batches.py``). Dividing each
micro-batch's mean by the number of micro-batches instead, as a loop written for equal micro-batches does, would
weight a pair of a small micro-batch more than one of a large one: the error trainers made with gradient
accumulation over uneven batches.

Batch-coupled losses (``PreferenceLoss.batch_coupled``: KTO and the other unpaired losses, whose z0 and KL
completions come from the micro-batch, and AOT, which sorts within it) are refused with a budget
(``dpo_components.settings.instantiate_loss``): with them the micro-batch size is part of the loss.
"""

from __future__ import annotations

from typing import Any

from dpo_components.data.collate import PreferenceCollator

Sample = dict[str, Any]


def plan_micro_batches(
    samples: list[Sample], batch_size: int, max_tokens: int | None, collate: PreferenceCollator
) -> list[list[int]]:
    """The micro-batches of one step's ``samples``, as lists of indices into them.

    ``max_tokens`` None: consecutive runs of ``batch_size`` (the fixed split). Otherwise first-fit decreasing: the
    pairs, costliest alone first (ties in step order), each into the first micro-batch whose batch it still fits
    (``collate.computed_positions``, padding included, at most ``max_tokens``), else into a new one. Each
    micro-batch lists its pairs in step order, and the micro-batches are ordered by their first pair.
    Deterministic, so a resumed run splits a step as the first run did. A pair that alone exceeds the budget
    raises (the recipes refuse such a pair at setup, :func:`check_pairs_fit_budget`)."""
    if max_tokens is None:
        starts = range(0, len(samples), batch_size)
        return [list(range(start, min(start + batch_size, len(samples)))) for start in starts]
    alone = [collate.computed_positions([sample]) for sample in samples]
    data = [collate.data_positions([sample]) for sample in samples]
    micro_batches: list[list[int]] = []
    loads: list[int] = []  # each micro-batch's data positions: a lower bound of what it computes, to skip quickly
    for i in sorted(range(len(samples)), key=lambda i: -alone[i]):
        if alone[i] > max_tokens:
            raise ValueError(f"max_micro_batch_tokens: pair {samples[i].get('index', i)} alone computes {alone[i]} "
                             f"positions, more than {max_tokens}")  # fmt: skip
        for m, members in enumerate(micro_batches):
            if loads[m] + data[i] > max_tokens:
                continue  # too much data already, without collating
            if collate.computed_positions([samples[j] for j in [*members, i]]) <= max_tokens:
                members.append(i)
                loads[m] += data[i]
                break
        else:
            micro_batches.append([i])
            loads.append(data[i])
    return sorted(sorted(members) for members in micro_batches)


def split_to_count(micro_batches: list[list[int]], count: int) -> list[list[int]]:
    """``micro_batches`` split until there are ``count``: each time the one with the most pairs (the first of
    those) into its first and second half. Under FSDP every rank must run the same number of forward and backward
    passes (each is a collective), so the ranks agree on the largest count and the others split to it; that is
    always possible, since each rank's step holds the same number of pairs. A half computes no more positions than
    its whole in the padded layouts; packed, it holds fewer tokens and is not re-checked against the budget."""
    micro_batches = [list(members) for members in micro_batches]
    if count < len(micro_batches) or count > sum(len(members) for members in micro_batches):
        raise ValueError(f"cannot split {len(micro_batches)} micro-batches of "
                         f"{sum(len(m) for m in micro_batches)} pairs into {count}")  # fmt: skip
    while len(micro_batches) < count:
        largest = max(range(len(micro_batches)), key=lambda m: len(micro_batches[m]))
        members = micro_batches[largest]
        micro_batches[largest : largest + 1] = [members[: len(members) // 2], members[len(members) // 2 :]]
    return micro_batches


def check_pairs_fit_budget(max_tokens: int, collate: PreferenceCollator, **datasets: Any) -> None:
    """Refuse a dataset (by config key; None is skipped) with a pair that alone, in ``collate``'s layout, computes
    more than ``max_tokens`` positions, naming it: at setup, not at the step that draws it."""
    for where, dataset in datasets.items():
        for i in range(len(dataset) if dataset is not None else 0):
            cost = collate.computed_positions([dataset[i]])
            if cost > max_tokens:
                raise ValueError(f"max_micro_batch_tokens: pair {i} of {where} ({dataset.source} row "
                                 f"{dataset.row_numbers[i]}) alone computes {cost} positions in the batch layout, "
                                 f"more than max_micro_batch_tokens {max_tokens}")  # fmt: skip
