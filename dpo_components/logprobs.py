"""Per-sequence log-probs of the response tokens, without materialising the [N, L, V] logits.

torchtune 0.6.1's DPO recipes run the whole output projection, cast the [2B, L, V] logits to fp32 and take a
``log_softmax`` over them (a second fp32 [2B, L, V] tensor) before gathering one value per token. For Llama 3
(V = 128256) at 8 x 1024 tokens each of those tensors is ~4.2 GB.

:func:`sequence_logprobs` instead keeps only the final hidden states of **response** positions (prompt and
padding positions need no logits at all) and projects them to the vocabulary ``chunk_size`` tokens at a time:

    log p(y_t) = logits[y_t] - logsumexp(logits),     logits = output(norm(h_t)) in fp32

Each chunk runs under activation checkpointing, so autograd keeps only the chunk's hidden states and recomputes
its logits in the backward pass: peak logits memory is one [chunk_size, V] fp32 block in forward and backward,
at the cost of one extra output-projection matmul per token in the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dpo_components.data.dataset import IGNORE_INDEX
from dpo_components.losses import SequenceLogProbs
from dpo_components.models.attention_masks import attention_mask
from dpo_components.models.document_attention import supports_document_attention
from dpo_components.vision.collate import vision_inputs
from dpo_components.vision.model import text_decoder

HiddenSink = Callable[[Tensor, Tensor, int], None]  # (final hidden states [T, D], sequence ids [T], num sequences)


def _target_logprobs(hidden: Tensor, targets: Tensor, output: Callable[[Tensor], Tensor]) -> Tensor:
    logits = output(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def chunked_target_logprobs(
    hidden: Tensor, targets: Tensor, output: Callable[[Tensor], Tensor], chunk_size: int = 256
) -> Tensor:
    """log p(target) for each row of ``hidden`` [T, D] under ``output`` (D -> V), ``chunk_size`` rows at a time."""
    pieces = []
    for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_target_logprobs, h, t, output, use_reentrant=False))
        else:
            pieces.append(_target_logprobs(h, t, output))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    chunk_size: int = 256,
    ignore_index: int = IGNORE_INDEX,
    hidden_sink: HiddenSink | None = None,
    **forward_kwargs,
) -> tuple[Tensor, Tensor]:
    """Run ``model`` (a torchtune ``TransformerDecoder``, or ``ImagePairFusion`` with its image inputs in
    ``forward_kwargs``) and return per-sequence (log-prob sums, token counts).

    ``labels`` are aligned with ``input_ids`` (torchtune's convention): position t's label is the token itself, and
    it is scored by the logits at position t - 1. ``ignore_index`` marks prompt and padding positions. Both
    outputs have shape [N] (float32 sums, int64 counts).
    """
    if labels.shape != input_ids.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ in shape")
    n, length = labels.shape
    keep = labels[:, 1:] != ignore_index
    rows, columns = keep.nonzero(as_tuple=True)
    return scored_logprobs(
        model, input_ids, positions=rows * length + columns, targets=labels[:, 1:][keep], sequence_ids=rows,
        num_sequences=n, chunk_size=chunk_size, hidden_sink=hidden_sink, **forward_kwargs,
    )  # fmt: skip


def scored_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    positions: Tensor,
    targets: Tensor,
    sequence_ids: Tensor,
    num_sequences: int,
    chunk_size: int = 256,
    hidden_sink: HiddenSink | None = None,
    **forward_kwargs,
) -> tuple[Tensor, Tensor]:
    """The general form: token ``k`` to score is ``targets[k]``, predicted by the final hidden state at flat index
    ``positions[k]`` of the [B, L] input, and it counts towards sequence ``sequence_ids[k]`` (of
    ``num_sequences``). Returns per-sequence (log-prob sums, token counts). ``forward_kwargs`` go to the model
    (``mask``, ``input_pos`` for prefix sharing; a vision model's image inputs).

    The chunked head runs *inside* the model's forward (by replacing ``model.unembed`` for the call), so it sees
    the output projection exactly as the model does: tied, LoRA, NF4, or sharded by FSDP. ``hidden_sink``, if
    given, is called with those final hidden states (after the norm, [T, D]), ``sequence_ids`` and
    ``num_sequences`` (the data audit's CHES reads them there: ``dpo_components.audit``).
    """

    decoder = text_decoder(model)  # the model itself, or a vision model's text decoder

    def unembed(h: Tensor) -> Tensor:
        # RMSNorm is per position, so normalising only the scored positions is exact.
        hidden = decoder.norm(h.flatten(0, 1)[positions])
        if hidden_sink is not None:
            hidden_sink(hidden, sequence_ids, num_sequences)
        return chunked_target_logprobs(hidden, targets, decoder.output, chunk_size)

    decoder.unembed = unembed
    try:
        token_logps = model(input_ids, **forward_kwargs)
    finally:
        del decoder.unembed  # back to the class's own unembed
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=input_ids.device)
    sums = sums.index_add(0, sequence_ids, token_logps)
    return sums, torch.bincount(sequence_ids, minlength=num_sequences)


def full_logits_sequence_logprobs(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """The naive computation from full [N, L, V] logits, as torchtune's ``rlhf.get_batch_log_probs`` does it.

    Kept for tests and benchmarks as the baseline the chunked path must equal.
    """
    targets = labels[:, 1:].clone()
    keep = targets != ignore_index
    targets[~keep] = 0
    token_logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * keep).sum(-1), keep.sum(-1)


def concatenated_logprobs(
    model: nn.Module,
    batch: dict[str, Tensor],
    chunk_size: int = 256,
    flex_attention: bool = True,
    hidden_sink: HiddenSink | None = None,
) -> SequenceLogProbs:
    """One forward over the batch -> per-pair log-prob sums and counts. The batch is either the standard [2B, L]
    one (chosen rows, then rejected), with prefix sharing B shared rows (``dpo_components.data.prefix_sharing``;
    ``flex_attention`` False masks them for SDPA instead of FlexAttention on CUDA), or packed rows
    (``dpo_components.data.packing``: several pairs' documents per row).

    Unpaired rows (a ``desirable`` key, KTO) carry their KL completions as the second half; no loss differentiates
    through those (z0 is detached), so with grad enabled the standard layout scores them in a second forward under
    ``torch.no_grad()``, as TRL does, and the backward pass covers the completions only. (Prefix-shared and packed
    rows hold both in one forward, and so do rows with images: a second forward would encode them again.)

    Image-grounded pairs (``dpo_components.vision.collate``) carry their images once per pair; the model
    (``ImagePairFusion``) encodes them once and feeds every row its pair's embeddings."""
    desirable = batch.get("desirable")
    images = vision_inputs(batch)
    if "segments" in batch:
        logps, tokens = scored_logprobs(
            model, batch["input_ids"], batch["score_positions"], batch["score_targets"], batch["score_sequences"],
            num_sequences=2 * len(batch["index"]), chunk_size=chunk_size, hidden_sink=hidden_sink,
            input_pos=batch["input_pos"], **images,
            mask=attention_mask(batch["segments"], flex_attention, batch.get("documents"),
                                by_document=supports_document_attention(model)),
        )  # fmt: skip
    elif desirable is not None and torch.is_grad_enabled() and not images:
        rows, labels = batch["input_ids"].chunk(2), batch["labels"].chunk(2)
        logps, tokens = sequence_logprobs(model, rows[0], labels[0], chunk_size=chunk_size)
        with torch.no_grad():
            kl_logps, kl_tokens = sequence_logprobs(model, rows[1], labels[1], chunk_size=chunk_size)
        logps, tokens = torch.cat([logps, kl_logps]), torch.cat([tokens, kl_tokens])
    else:
        input_ids, labels = batch["input_ids"], batch["labels"]
        logps, tokens = sequence_logprobs(model, input_ids, labels, chunk_size, hidden_sink=hidden_sink, **images)
    return SequenceLogProbs.from_concatenated(logps, tokens, desirable)
