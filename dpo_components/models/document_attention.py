"""Attention one document at a time, for prefix-shared and packed rows where there is no FlexAttention (CPU).

A prefix-shared or packed row (``dpo_components.data.prefix_sharing``, ``dpo_components.data.packing``) holds
documents ``[prompt | first | second]`` (``second`` empty when a document holds one response), and a token may
see only the earlier tokens of its own document's prompt and its own response. SDPA with a dense [B, L, L] mask
computes every score of a row, the masked ones too, so its cost grows with the square of the row: a packed row
of three documents does three times the attention work its documents need. Here each document instead takes
two SDPA calls of its own size, which compute no score across documents and none of the padding:

    [prompt | first] -> [prompt | first]     causal (is_causal: the kernel skips the upper triangle)
    second           -> [prompt | second]    a [S, P + S] mask: the whole prompt, then causal within ``second``

Both are exactly the rows of the dense mask's softmax that these tokens have (the masked scores are -inf there,
so they add nothing), and RoPE already sits in q and k, so outputs equal the dense path's up to float rounding
(``tests/components/test_packing.py``). Padding positions get zeros: nothing reads them.

A torchtune patch (listed in ``dpo_components/models/__init__.py``): :func:`document_attention` replaces each
attention module's ``_attention_call`` (torchtune's ``_sdpa_or_flex_attention()``, set per instance in
``MultiHeadAttention.__init__``) by a wrapper that takes a :class:`DocumentMask` one document at a time and hands
anything else (None, a tensor, a FlexAttention ``BlockMask``) to the original. Modules without
``_attention_call`` (torchtune's ``Gemma2Attention``, which adds soft-capping to its own score computation) are
left alone, and a model that has one of them gets the dense mask (:func:`supports_document_attention`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpo_components.data.segments import PADDING, PROMPT


@dataclass(frozen=True)
class Document:
    """One document of a row: it starts at ``start`` with ``prompt`` tokens, then ``first`` and ``second``."""

    row: int
    start: int
    prompt: int
    first: int
    second: int


@dataclass(frozen=True)
class DocumentMask:
    """The documents of a [B, L] batch of prefix-shared or packed rows, passed to the model as its ``mask``."""

    documents: tuple[Document, ...]
    rows: int
    length: int
    second_masks: dict[tuple[int, int], Tensor]  # (prompt, second) -> the [second, prompt + second] mask

    @classmethod
    def from_segments(cls, segments: Tensor, documents: Tensor | None = None) -> DocumentMask:
        """From the batch's ``segments`` [B, L] (PROMPT / CHOSEN / REJECTED / PADDING) and, for packed rows, its
        ``documents`` [B, L] (the document's number in its row, -1 for padding; None: one document per row)."""
        rows, length = segments.shape
        found, masks = [], {}
        key = segments if documents is None else (documents + 1) * 4 + segments  # runs of one (document, segment)
        for row in range(rows):
            values, counts = torch.unique_consecutive(key[row].cpu(), return_counts=True)
            start, runs = 0, []  # the runs of the current document: (segment, length)
            for value, count in zip(values.tolist(), counts.tolist()):
                segment = value % 4
                if segment == PROMPT and runs or segment == PADDING:  # a new document, or the row's padding
                    start = _close(runs, row, start, found)
                if segment == PADDING:
                    start += count
                    continue
                runs.append((segment, count))
            _close(runs, row, start, found)
        for doc in found:
            if doc.second and (doc.prompt, doc.second) not in masks:
                response = torch.arange(doc.second, device=segments.device)
                masks[doc.prompt, doc.second] = torch.cat(
                    [torch.ones(doc.second, doc.prompt, dtype=torch.bool, device=segments.device),
                     response[None, :] <= response[:, None]], dim=1)  # fmt: skip
        return cls(tuple(found), rows, length, masks)


def _close(runs: list[tuple[int, int]], row: int, start: int, found: list[Document]) -> int:
    """Append the document made of ``runs`` (then emptied) and return where the next one starts."""
    if not runs:
        return start
    if runs[0][0] != PROMPT or len(runs) > 3:
        raise ValueError(f"document attention: row {row} at {start} is not [prompt | response (| response)]: {runs}")
    lengths = [count for _, count in runs] + [0, 0]
    found.append(Document(row, start, *lengths[:3]))
    runs.clear()
    return start + sum(lengths)


@torch.compiler.disable  # the documents are Python data: under compile they would recompile every batch
def attention_by_document(q: Tensor, k: Tensor, v: Tensor, mask: DocumentMask, dropout_p: float = 0.0) -> Tensor:
    """q, k, v [B, H, L, D] (k and v already expanded to q's heads, as torchtune does) -> the attention output
    [B, H, L, D], each document attending only within itself (module docstring)."""
    pieces: list[list[tuple[int, Tensor]]] = [[] for _ in range(mask.rows)]
    for doc in mask.documents:
        r, s, p, first = doc.row, doc.start, doc.prompt, doc.start + doc.prompt + doc.first
        rq, rk, rv = q[r : r + 1], k[r : r + 1], v[r : r + 1]
        pieces[r].append((s, F.scaled_dot_product_attention(
            rq[:, :, s:first], rk[:, :, s:first], rv[:, :, s:first], dropout_p=dropout_p, is_causal=True)))  # fmt: skip
        if doc.second:
            end = first + doc.second
            keys = torch.cat([rk[:, :, s : s + p], rk[:, :, first:end]], dim=2)
            values = torch.cat([rv[:, :, s : s + p], rv[:, :, first:end]], dim=2)
            pieces[r].append((first, F.scaled_dot_product_attention(
                rq[:, :, first:end], keys, values, attn_mask=mask.second_masks[p, doc.second],
                dropout_p=dropout_p)))  # fmt: skip
    out = []
    for row in pieces:
        parts, at = [], 0
        for start, piece in row:  # in position order: from_segments finds the documents left to right
            if start > at:  # padding before this piece
                parts.append(q.new_zeros(1, q.shape[1], start - at, v.shape[-1]))
            parts.append(piece)
            at = start + piece.shape[2]
        if at < mask.length:
            parts.append(q.new_zeros(1, q.shape[1], mask.length - at, v.shape[-1]))
        out.append(torch.cat(parts, dim=2))
    return torch.cat(out, dim=0)


def _by_document(original: Callable) -> Callable:
    def attention_call(q: Tensor, k: Tensor, v: Tensor, mask, dropout_p: float, is_causal: bool) -> Tensor:
        if isinstance(mask, DocumentMask):
            return attention_by_document(q, k, v, mask, dropout_p)
        return original(q, k, v, mask=mask, dropout_p=dropout_p, is_causal=is_causal)

    attention_call.__dict__.update(original.__dict__)  # the markers of other per-instance wrappers
    attention_call.takes_document_masks = True
    return attention_call


def _is_attention(module: nn.Module) -> bool:
    return hasattr(module, "q_proj") and hasattr(module, "k_proj")


def document_attention(model: nn.Module) -> nn.Module:
    """Let every attention module of ``model`` that calls torchtune's ``_attention_call`` take a
    :class:`DocumentMask` (module docstring). Idempotent; returns ``model``."""
    for module in model.modules():
        call = getattr(module, "_attention_call", None)
        if call is not None and not getattr(call, "takes_document_masks", False):
            module._attention_call = _by_document(call)
    return model


def supports_document_attention(model: nn.Module) -> bool:
    """Whether every attention module of ``model`` takes a :class:`DocumentMask` (:func:`document_attention`)."""
    attentions = [m for m in model.modules() if _is_attention(m)]
    return bool(attentions) and all(getattr(getattr(m, "_attention_call", None), "takes_document_masks", False)
                                    for m in attentions)  # fmt: skip
