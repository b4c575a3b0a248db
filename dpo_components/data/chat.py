"""The chat side of a torchtune tokenizer, for every family: messages to token ids with the end of turn on,
the generation prompt, the stop tokens of sampling, and ids back to text."""

from __future__ import annotations

import inspect
from typing import Any

from torchtune.data import Message
from torchtune.models.gemma._tokenizer import GemmaTokenizer
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from dpo_components.data.errors import BadRow
from dpo_components.data.tools import uses_tools

# torchtune 0.6.1 names the end-of-sequence switch of ``tokenize_messages`` per family.
_END_SWITCHES = ("add_end_tokens", "add_eos")  # Llama 2 / Llama 3; Qwen2/2.5, Mistral, Gemma, Phi-3, Phi-4
_PROBES = ("the", "film", "?")  # responses whose first tokens differ in any vocabulary


def check_tokenizer(tokenizer: Any) -> None:
    """Refuse, naming its class, a tokenizer the data builder cannot drive: not a torchtune ``ModelTokenizer``, or one
    whose ``tokenize_messages`` has no end-of-sequence switch of a known name (``_END_SWITCHES``)."""
    method = getattr(tokenizer, "tokenize_messages", None)
    parameters = inspect.signature(method).parameters if callable(method) else {}
    if not any(name in parameters for name in _END_SWITCHES):
        name = f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"
        raise TypeError(f"the preference data builder does not know tokenizer {name}: it needs a torchtune "
                        f"ModelTokenizer whose tokenize_messages takes one of {', '.join(_END_SWITCHES)} (torchtune's "
                        "tokenizers for Llama, Qwen, Mistral, Gemma, Phi; dpo_components' own)")  # fmt: skip


def supports_tools(tokenizer: ModelTokenizer) -> bool:
    """Whether the tokenizer writes tool definitions, calls and results as its family's released template does
    (its ``tokenize_messages`` takes ``tools``: Llama 3.1+, Qwen2.5 and Qwen3 here)."""
    return "tools" in inspect.signature(tokenizer.tokenize_messages).parameters


def _tokenize_messages(
    tokenizer: ModelTokenizer, messages: list[Message], end: bool, tools: list[dict[str, Any]] | None = None
) -> tuple[list[int], list[bool]]:
    parameters = inspect.signature(tokenizer.tokenize_messages).parameters
    switch = next((name for name in _END_SWITCHES if name in parameters), None)
    if switch is None:
        check_tokenizer(tokenizer)  # raises, naming the tokenizer
    extra: dict[str, Any] = {}
    if tools or uses_tools(messages):
        if not supports_tools(tokenizer):
            what = "tool definitions" if tools else "tool calls or results"
            raise BadRow(f"the row has {what}, and {type(tokenizer).__name__}'s chat format has no tool support "
                         "here (tools are written as the released templates of Llama 3.1/3.2/3.3 Instruct, Qwen2.5 "
                         "and Qwen3 write them)", f"tool use in a row, which {type(tokenizer).__name__} cannot "
                         "write")  # fmt: skip
        extra["tools"] = tools or []
    try:
        return tokenizer.tokenize_messages(messages, **{switch: end}, **extra)
    except (ValueError, RuntimeError) as error:  # e.g. Mistral's template has no system turn
        raise BadRow(f"{type(tokenizer).__name__} cannot format these messages: {error}") from None


def tokenize_chat(
    tokenizer: ModelTokenizer, messages: list[Message], tools: list[dict[str, Any]] | None = None
) -> tuple[list[int], list[bool]]:
    """``messages`` (ending with the assistant's response) in the tokenizer's chat format with the family's end
    tokens on: (token ids, masked flags), whatever the family calls the switch and whatever its default (Phi-3
    and Phi-4 default to off, which leaves a response without its end of turn).

    The response then ends as the family trains it: Llama 3 <|eot_id|> (and a masked <|end_of_text|>), Qwen2/2.5
    and Phi-4 <|im_end|>, Phi-3 <|end|> + <|endoftext|>, Llama 2, Mistral and Gemma </s>.
    """
    return _tokenize_messages(tokenizer, messages, end=True, tools=tools)


def generation_prompt(
    tokenizer: ModelTokenizer, prompt: list[Message], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """The prompt in chat format followed by the assistant header: what a model is given at generation time.

    Found as the common start of the prompt followed by different assistant responses, so it holds for every
    family's format (an empty assistant turn would leave Phi-3's <|end|> in it), unless the tokenizer defines its
    own ``generation_prompt`` (Qwen3: the final turn's think block depends on the response).
    """
    messages = [Message(m.role, m.content, masked=True) for m in prompt]
    if callable(getattr(tokenizer, "generation_prompt", None)):
        if (tools or uses_tools(messages)) and not supports_tools(tokenizer):
            _tokenize_messages(tokenizer, messages, end=False, tools=tools)  # raises, naming the family
        try:
            return tokenizer.generation_prompt(messages, **({"tools": tools} if tools else {}))
        except (ValueError, RuntimeError) as error:  # as _tokenize_messages: a bad row, named by the caller
            raise BadRow(f"{type(tokenizer).__name__} cannot format these messages: {error}") from None
    probes = [tokenize_chat(tokenizer, messages + [Message("assistant", text)], tools)[0] for text in _PROBES]
    common = 0
    while all(len(p) > common for p in probes) and len({p[common] for p in probes}) == 1:
        common += 1
    return probes[0][:common]


_END_OF_TURN = ("<|end|>", "<end_of_turn>")  # Phi-3; Gemma (a user-defined SentencePiece piece)


def stop_tokens(tokenizer: ModelTokenizer) -> list[int]:
    """Token ids that end a sampled response: the tokenizer's ``stop_tokens`` and the family's end of turn where
    torchtune leaves it out (Phi-3's ``<|end|>``, Gemma's ``<end_of_turn>``)."""
    stops = list(getattr(tokenizer, "stop_tokens", None) or [tokenizer.eos_id])
    special = getattr(tokenizer, "special_tokens", None) or {}
    for marker in _END_OF_TURN:
        ids = [special[marker]] if marker in special else []
        if not ids and isinstance(tokenizer, GemmaTokenizer):
            ids = tokenizer.encode(marker, add_bos=False, add_eos=False)
        if len(ids) == 1 and ids[0] not in stops:
            stops.append(ids[0])
    return stops


def decode_text(tokenizer: ModelTokenizer, ids: list[int]) -> str:
    """``tokenizer.decode(ids)`` as text for every family: torchtune 0.6.1's Phi-4 tokenizer returns its byte-level
    BPE pieces (None for special tokens), joined and mapped back to UTF-8 here."""
    text = tokenizer.decode(ids)
    if isinstance(text, list):
        byte_decoder = tokenizer.tokenizer_model.byte_decoder
        text = bytes(byte_decoder[c] for c in "".join(p for p in text if p)).decode("utf-8", errors="replace")
    return text
