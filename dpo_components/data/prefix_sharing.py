"""Prefix sharing: one row per pair, ``[prompt | chosen | rejected]``, so the prompt is encoded once.

The standard layout runs 2B rows (prompt + chosen, prompt + rejected) and encodes every prompt twice. Here each
pair is one row (Wang et al. 2024, arXiv 2410.20305):

    tokens      p_0 .. p_P-1   c_0 .. c_C-1     r_0 .. r_R-1
    positions   0   .. P-1     P   .. P+C-1     P   .. P+R-1      (the rejected response restarts at P)
    segment     0              1                2                 (3 = padding)

and the attention mask lets a token see the earlier tokens of its own segment and the prompt:

    allowed(q, k) = k <= q  and  (segment[k] == segment[q]  or  (segment[k] == 0 and segment[q] != 3))

(padding sees only earlier padding: never an empty row, and FlexAttention skips the padding's blocks)

so every response token sees exactly the tokens and RoPE positions it sees in the standard layout, and the
log-probs and gradients equal the standard path's up to float rounding. The first token of each response is
predicted by the last prompt token; for the rejected response that hidden state is not the previous position,
so tokens are scored from explicit (position, target) lists instead of a shift by one.

The saving is the prompt's share of the tokens: with prompts as long as each response a third of the
computed tokens go. On CUDA the mask is a FlexAttention ``BlockMask``, which skips the fully masked blocks. Without
it (CPU: torch 2.13's flex_attention has no CPU backward; or ``prefix_sharing_attention: sdpa``,
``flex_attention=False``) attention runs one document at a time through SDPA
(``dpo_components.models.document_attention``, which computes no masked score), or, for a model whose attention
modules do not take that (Gemma 2), through SDPA with a dense [B, L, L] boolean mask.

The masks of these rows live beside the model code that reads them: ``dpo_components.models.attention_masks``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dpo_components.data.dataset import IGNORE_INDEX, PreferenceDataset, desirable_of
from dpo_components.data.segments import CHOSEN, PADDING, PROMPT, REJECTED


def packed_lengths(dataset: PreferenceDataset) -> list[int]:
    """Length of each pair's shared row: prompt + chosen + rejected."""
    return [len(s["prompt_ids"]) + len(s["chosen_response_ids"]) + len(s["rejected_response_ids"])
            for s in (dataset[i] for i in range(len(dataset)))]  # fmt: skip


def check_fits(max_seq_len: int, pad_to_multiple_of: int = 1, **datasets: PreferenceDataset | None) -> None:
    """Refuse a dataset (passed by name; None is skipped) whose shared rows, padded up to ``pad_to_multiple_of``,
    would be longer than the model's ``max_seq_len``."""
    for where, dataset in datasets.items():
        lengths = packed_lengths(dataset) if dataset is not None else []
        longest = max(lengths, default=0)
        padded = longest + (-longest % pad_to_multiple_of)
        if padded > max_seq_len:
            raise ValueError(
                f"prefix_sharing: pair {lengths.index(longest)} of {where} needs a row of {padded} tokens (prompt + "
                f"chosen + rejected{', padded' if padded > longest else ''}), more than the model's max_seq_len "
                f"{max_seq_len}; raise model.max_seq_len or turn prefix_sharing off"
            )


def collate_prefix_shared(
    batch: list[dict[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = IGNORE_INDEX,
    pad_to_multiple_of: int = 1,
) -> dict[str, Tensor]:
    """Pad B pairs into one [B, L] batch of shared rows.

    Returns ``input_ids``, ``input_pos`` and ``segments`` [B, L]; the tokens to score as ``score_positions``
    (flat index into [B, L] of the predicting position), ``score_targets`` and ``score_sequences`` (pair i's
    chosen response is sequence i, its rejected one B + i); and, as the standard collator, ``lengths`` [2B]
    (prompt + response, the tokens of the standard layout) and ``index`` [B].
    """
    longest = max(len(s["prompt_ids"]) + len(s["chosen_response_ids"]) + len(s["rejected_response_ids"])
                  for s in batch)  # fmt: skip
    length = longest + (-longest % pad_to_multiple_of)
    n = len(batch)
    input_ids = torch.full((n, length), padding_idx, dtype=torch.long)
    input_pos = torch.zeros((n, length), dtype=torch.long)
    segments = torch.full((n, length), PADDING, dtype=torch.long)
    positions, targets, sequences, lengths = [], [], [], torch.zeros(2 * n, dtype=torch.long)
    for row, sample in enumerate(batch):
        prompt = len(sample["prompt_ids"])
        if prompt == 0:
            raise ValueError(f"prefix_sharing: pair {sample['index']} has an empty prompt")
        input_ids[row, :prompt] = torch.tensor(sample["prompt_ids"])
        input_pos[row, :prompt] = torch.arange(prompt)
        segments[row, :prompt] = PROMPT
        start = prompt
        for side, segment in (("chosen", CHOSEN), ("rejected", REJECTED)):
            ids, labels = sample[f"{side}_response_ids"], torch.tensor(sample[f"{side}_labels"])
            end = start + len(ids)
            input_ids[row, start:end] = torch.tensor(ids)
            input_pos[row, start:end] = torch.arange(prompt, prompt + len(ids))
            segments[row, start:end] = segment
            # token k of the response is predicted at start + k - 1, except token 0: at the last prompt token
            predictors = torch.arange(start - 1, end - 1)
            predictors[0] = prompt - 1
            scored = labels != ignore_idx
            positions.append(row * length + predictors[scored])
            targets.append(labels[scored])
            sequence = row if segment == CHOSEN else n + row
            sequences.append(torch.full((int(scored.sum()),), sequence, dtype=torch.long))
            lengths[sequence] = prompt + len(ids)
            start = end
    return {
        "input_ids": input_ids, "input_pos": input_pos, "segments": segments,
        "score_positions": torch.cat(positions), "score_targets": torch.cat(targets),
        "score_sequences": torch.cat(sequences), "lengths": lengths,
        "index": torch.tensor([sample["index"] for sample in batch]),
        **desirable_of(batch),
    }  # fmt: skip
