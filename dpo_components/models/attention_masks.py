"""The attention masks of prefix-shared and packed rows, and the FlexAttention these models run them with.

A row's ``segments`` (``dpo_components.data.segments``) say which part of a pair each position holds; a packed row
also numbers its ``documents`` (``dpo_components.data.packing``). A token may see

    allowed(q, k) = k <= q  and  (segment[k] == segment[q]  or  (segment[k] == PROMPT and segment[q] != PADDING))
                    and (packed rows) document[k] == document[q]

:func:`attention_mask` builds that mask in the form the model's attention takes: a FlexAttention ``BlockMask`` on
CUDA (which skips the fully masked blocks), a :class:`~dpo_components.models.document_attention.DocumentMask`
(attention one document at a time through SDPA, no masked score computed: CPU), or a dense [B, L, L] boolean (a
model whose attention takes neither, e.g. Gemma 2).

A torchtune patch (listed in ``dpo_components/models/__init__.py``): torchtune compiles flex_attention once, with
``dynamic=False``, made for packed rows of one fixed length: every new row length recompiles it, and past dynamo's
recompile limit it runs uncompiled, materialising the scores. Our rows vary in length, so
:func:`flex_attention_any_length` makes each attention module of a model (per instance, by ``apply_model_fixes``:
torchtune's module global is left alone) run a ``BlockMask`` through a ``dynamic=True`` compile of flex_attention
(one compile for all lengths, called outside any compiled graph as torchtune's own call is), and go back to
torchtune's call, for the whole model, should that compile fail on some torch or GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch._dynamo.exc import TorchDynamoException
from torchtune.utils import get_logger
from torchtune.utils._import_guard import _SUPPORTS_FLEX_ATTENTION

from dpo_components.data.segments import PADDING, PROMPT
from dpo_components.models.document_attention import DocumentMask

log = get_logger("INFO")


def _allowed(segments: Tensor, documents: Tensor | None, b: Tensor, q: Tensor, k: Tensor) -> Tensor:
    segment_q, segment_k = segments[b, q], segments[b, k]
    allowed = (k <= q) & ((segment_k == segment_q) | ((segment_k == PROMPT) & (segment_q != PADDING)))
    if documents is not None:  # packed rows (dpo_components.data.packing): only within one's own document
        allowed = allowed & (documents[b, k] == documents[b, q])
    return allowed


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

        def mask_mod(b, h, q, k):
            return _allowed(segments, documents, b, q, k)

        return create_block_mask(mask_mod, n, None, length, length, device=segments.device)
    if by_document:
        return DocumentMask.from_segments(segments, documents)
    idx = torch.arange(length, device=segments.device)
    return _allowed(segments, documents, torch.arange(n, device=segments.device)[:, None, None],
                    idx[None, :, None], idx[None, None, :])  # fmt: skip


@functools.cache
def dynamic_flex_attention() -> Callable:
    """flex_attention compiled with ``dynamic=True`` (compiled once per process, on first use)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


class _Fallback:
    """Whether the dynamic compile failed for a model: then its attention modules use torchtune's own call."""

    failed = False


@torch.compiler.disable(recursive=False)  # as torchtune's compile_friendly_flex_attention: no nested compile
def _flex_any_length(q: Tensor, k: Tensor, v: Tensor, block_mask, fallback: _Fallback) -> Tensor | None:
    """flex_attention through the dynamic compile, or None (and the model's fallback set) when it fails."""
    try:
        return dynamic_flex_attention()(q, k, v, block_mask=block_mask)
    except TorchDynamoException as error:  # a compiler failure: keep training, with torchtune's compile
        log.warning(f"dynamic flex_attention compile failed, using torchtune's static one: {error}")
        fallback.failed = True
        return None


def _any_length(original: Callable, fallback: _Fallback) -> Callable:
    def attention_call(q: Tensor, k: Tensor, v: Tensor, mask, dropout_p: float, is_causal: bool) -> Tensor:
        if _is_block_mask(mask) and dropout_p == 0.0 and not fallback.failed:
            out = _flex_any_length(q, k, v, mask, fallback)
            if out is not None:
                return out
        return original(q, k, v, mask=mask, dropout_p=dropout_p, is_causal=is_causal)

    attention_call.__dict__.update(original.__dict__)  # the markers of other per-instance wrappers
    attention_call.flex_any_length = True
    return attention_call


def _is_block_mask(mask: object) -> bool:
    if not _SUPPORTS_FLEX_ATTENTION:
        return False
    from torch.nn.attention.flex_attention import BlockMask

    return isinstance(mask, BlockMask)


def flex_attention_any_length(model: nn.Module) -> nn.Module:
    """Let every attention module of ``model`` that calls torchtune's ``_attention_call`` run a FlexAttention
    ``BlockMask`` through one dynamic compile (module docstring); should it fail, the whole model goes back to
    torchtune's call, with one warning. Idempotent; returns ``model``."""
    fallback = _Fallback()
    for module in model.modules():
        call = getattr(module, "_attention_call", None)
        if call is not None and not getattr(call, "flex_any_length", False):
            module._attention_call = _any_length(call, fallback)
    return model
