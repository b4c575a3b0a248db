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

torchtune compiles flex_attention with ``dynamic=False``, made for packed rows of one fixed length: every new
row length recompiles it, and past dynamo's recompile limit it runs uncompiled, materialising the scores. Our
rows vary in length, so :func:`attention_mask` swaps in a ``dynamic=True`` compile of flex_attention the first
time it builds a ``BlockMask`` (one compile for all lengths).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch._dynamo.exc import TorchDynamoException
from torchtune.utils import get_logger
from torchtune.utils._import_guard import _SUPPORTS_FLEX_ATTENTION

from dpo_components.data.dataset import IGNORE_INDEX, PreferenceDataset, desirable_of

PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, 3
log = get_logger("INFO")


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


def _allowed(segments: Tensor, documents: Tensor | None, b: Tensor, q: Tensor, k: Tensor) -> Tensor:
    segment_q, segment_k = segments[b, q], segments[b, k]
    allowed = (k <= q) & ((segment_k == segment_q) | ((segment_k == PROMPT) & (segment_q != PADDING)))
    if documents is not None:  # packed rows (dpo_components.data.packing): only within one's own document
        allowed = allowed & (documents[b, k] == documents[b, q])
    return allowed


# A torchtune patch (listed in dpo_components/models/__init__.py): whether torchtune's flex_attention compile has been
# swapped for a dynamic one: False not yet, True swapped, None swapped and failed (torchtune's static compile is used
# again)
_FLEX = {"dynamic": False}


def _compile_flex_dynamic() -> None:
    """Replace torchtune's static flex_attention compile by a dynamic one (its wrapper looks the global up at
    every call); should the dynamic compile fail on some torch/GPU, fall back to torchtune's."""
    import torchtune.modules.attention_utils as attention_utils
    from torch.nn.attention.flex_attention import flex_attention

    if _FLEX["dynamic"] is not False:  # already swapped in (True), or swapped and failed (None)
        return
    static, dynamic = attention_utils.flex_attention_compiled, torch.compile(flex_attention, dynamic=True)

    def flex_attention_any_length(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
        if _FLEX["dynamic"]:
            try:
                return dynamic(q, k, v, block_mask=block_mask)
            except TorchDynamoException as error:  # a compiler failure: keep training, with torchtune's compile
                log.warning(f"dynamic flex_attention compile failed, using torchtune's static one: {error}")
                _FLEX["dynamic"] = None
        return static(q, k, v, block_mask=block_mask)

    attention_utils.flex_attention_compiled = flex_attention_any_length
    _FLEX["dynamic"] = True


def attention_mask(
    segments: Tensor, flex_attention: bool = True, documents: Tensor | None = None, by_document: bool = False
):
    """The shared-row mask: a FlexAttention ``BlockMask`` on CUDA (where torchtune uses flex) unless
    ``flex_attention`` is False; else, with ``by_document`` (a model whose attention takes it:
    ``dpo_components.models.document_attention``), a ``DocumentMask`` for attention one document at a time;
    else a dense [B, L, L] boolean for SDPA (True = may attend). With ``documents`` (packed rows), a token
    attends only within its own document."""
    n, length = segments.shape
    if segments.is_cuda and _SUPPORTS_FLEX_ATTENTION and flex_attention:
        from torch.nn.attention.flex_attention import create_block_mask

        _compile_flex_dynamic()

        def mask_mod(b, h, q, k):
            return _allowed(segments, documents, b, q, k)

        return create_block_mask(mask_mod, n, None, length, length, device=segments.device)
    if by_document:
        from dpo_components.models.document_attention import DocumentMask

        return DocumentMask.from_segments(segments, documents)
    idx = torch.arange(length, device=segments.device)
    return _allowed(segments, documents, torch.arange(n, device=segments.device)[:, None, None],
                    idx[None, :, None], idx[None, None, :])  # fmt: skip
