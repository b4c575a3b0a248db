"""The order a recipe draws pairs in: a seeded permutation per epoch, or batches of similar length. Each depends
only on (seed, epoch), so a resumed run rebuilds it and skips exactly the batches it has trained on."""

from __future__ import annotations

import torch

from dpo_components.data.dataset import PreferenceDataset
from dpo_components.data.prefix_sharing import packed_lengths


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch), so a resumed run can
    rebuild it and skip exactly the batches it has already trained on."""
    if not shuffle:
        return list(range(num_samples))
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


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
