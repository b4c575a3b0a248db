"""Preference data: one builder over ``datasets.load_dataset`` for the formats people have, and the collator.

Row formats (``format=``, or ``"auto"`` to detect per row; ``column_map`` maps our column names to the data's,
e.g. ``{"prompt": "question", "chosen": "response_j", "rejected": "response_k"}``; a mapped column wins over a
column that already has our name):

- ``explicit``: ``prompt``, ``chosen``, ``rejected`` are strings (stack-exchange-paired, orca_dpo_pairs, the
  synthetic task). A prompt already in HH-RLHF form (``"\\n\\nHuman: ...\\n\\nAssistant:"``, Dahoas/full-hh-rlhf)
  is split into its turns;
- ``conversational``: all three are lists of messages (TRL's conversational format); ``chosen`` / ``rejected``
  hold the assistant turn(s) only, or one message (LLaMA-Factory's ShareGPT preference format);
- ``implicit``: ``chosen`` and ``rejected`` are whole conversations that share their first turns, which are
  the prompt (UltraFeedback-binarized, torchtune's ``preference_dataset``); a ``prompt`` column is ignored;
- ``hh``: Anthropic HH-RLHF raw strings, ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``, split into turns and then
  treated as ``implicit``.

A message is ``{"role", "content"}`` or ShareGPT's ``{"from", "value"}`` (roles human/gpt/system); its content a
string or an OpenAI-style list of text parts ``[{"type": "text", "text": ...}]`` (joined). A ``system`` column
(or ``column_map["system"]``) becomes a system message at the start of the prompt.

Each row is tokenized with the model tokenizer's chat format (``tokenize_messages``); the prompt (with the
assistant header that opens the response, i.e. the generation prompt) is masked out of the labels (-100).
Truncation, when prompt + longer response exceeds ``max_length``:

1. a prompt longer than ``max_prompt_length`` tokens loses whole turns first, oldest exchange first (never the
   system turn), then the start of its oldest remaining turn's text at a word boundary, so the chat format
   (BOS, system turn, headers) stays intact and the latest text is kept, as in the original DPO code's
   ``keep_end`` mode;
2. both responses are cut to the tokens left, ``max_length - len(prompt)`` (keeping their start).

``max_prompt_length < max_length`` is enforced, so every sample keeps at least one response token: there is
no silent constant ln 2 loss from an empty response (torchtune 0.6.1 trains such rows). Bad rows (missing
column, wrong type, empty response, chosen identical to rejected, a prompt that cannot fit) raise
:class:`PreferenceDataError` naming the file and row (the row's 0-based index in the split, and the 1-based line
for a JSON-lines or CSV file), or with ``on_bad_row="skip"`` are skipped and counted in a summary line.
``holdout_fraction`` with ``part="heldout"`` gives a seeded held-out split of the same rows.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from datasets import Dataset as HFDataset
from datasets import ReadInstruction, concatenate_datasets, load_dataset
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset
from torchtune.data import Message
from torchtune.models.gemma._tokenizer import GemmaTokenizer
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from dpo_components.logprobs import IGNORE_INDEX

log = logging.getLogger(__name__)

FORMATS = ("explicit", "conversational", "implicit", "hh")
COLUMNS = ("prompt", "chosen", "rejected", "system")  # the names column_map maps from
_ROLES = {
    "system": "system", "user": "user", "assistant": "assistant", "ipython": "ipython", "tool": "ipython",
    "human": "user", "gpt": "assistant", "model": "assistant",  # ShareGPT, Gemma
}  # fmt: skip
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


class PreferenceDataError(ValueError):
    """A malformed preference row or source; the message names the source and the row."""


class _BadRow(Exception):
    """Internal: why one row is unusable (turned into PreferenceDataError or a skip count).

    ``summary`` is the reason without row-specific details, the bucket rows are counted in when skipped.
    """

    def __init__(self, why: str, summary: str | None = None) -> None:
        super().__init__(why)
        self.summary = summary or why


# ----------------------------------------------------------------------------------------------- row parsing


def detect_format(row: dict[str, Any]) -> str | None:
    """Guess the format of one (already column-mapped) row from its chosen (or, if null, rejected) value."""
    response = row.get("chosen") if row.get("chosen") is not None else row.get("rejected")
    if isinstance(response, (list, dict)):
        return "conversational" if isinstance(row.get("prompt"), list) else "implicit"
    if isinstance(response, str):
        if "prompt" in row:
            return "explicit"
        if response.lstrip("\n").startswith("Human:"):
            return "hh"
    return None


def _field(row: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if row.get(key) is None:  # datasets fills a key missing from some rows with None
        raise _BadRow(f"missing '{key}' (no such column, or a null value)")
    value = row[key]
    if not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join(k.__name__ for k in kinds)
        raise _BadRow(f"'{key}' must be a {expected}, got {type(value).__name__}")
    return value


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or OpenAI-style text parts joined (as chat templates render them)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _BadRow(f"{where} has a content part of type '{kind}'; only text parts are supported",
                              "a message has a non-text content part")  # fmt: skip
        return "".join(texts)
    raise _BadRow(f"{where} content must be a string or a list of text parts, got {type(value).__name__}",
                  "a message has malformed content")  # fmt: skip


def _messages(value: list[Any] | dict[str, Any], key: str) -> list[Message]:
    """Messages in {"role", "content"} or ShareGPT {"from", "value"} form; one message alone is a list of one."""
    messages = []
    for i, m in enumerate([value] if isinstance(value, dict) else value):
        where = f"'{key}'[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role", m.get("from")), str):
            raise _BadRow(f"{where} must be a {{'role', 'content'}} (or {{'from', 'value'}}) message, got {m!r:.80}",
                          f"'{key}' holds a malformed message")  # fmt: skip
        role = m.get("role", m.get("from"))
        if role not in _ROLES:
            raise _BadRow(f"{where} has unknown role '{role}' (expected one of {sorted(_ROLES)})")
        messages.append(Message(role=_ROLES[role], content=_content(m.get("content", m.get("value")), where)))
    return messages


def _split_hh(text: str, key: str) -> list[Message]:
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if parts[0].strip() or len(parts) < 3:
        raise _BadRow(f"'{key}' is not in HH-RLHF form ('\\n\\nHuman: ...\\n\\nAssistant: ...')")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [Message(role=roles[who], content=said) for who, said in zip(parts[1::2], parts[2::2])]


def _hh_prompt(text: str) -> list[Message] | None:
    """The turns of an explicit prompt written in HH form ("\\n\\nHuman: ...\\n\\nAssistant:"), else None."""
    if not (text.lstrip("\n").startswith("Human:") and text.rstrip().endswith("\n\nAssistant:")):
        return None
    turns = _split_hh(text.rstrip(), "prompt")
    if turns[-1].role != "assistant" or turns[-1].text_content.strip():
        return None
    return turns[:-1]  # the empty last Assistant turn is the generation prompt


def _split_shared_prefix(chosen: list[Message], rejected: list[Message]) -> tuple[list, list, list]:
    shared = 0
    for a, b in zip(chosen, rejected):
        if (a.role, a.text_content) != (b.role, b.text_content):
            break
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise _BadRow("chosen and rejected are identical")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _explicit(row: dict[str, Any]) -> tuple[list[Message], list[Message], list[Message]]:
    prompt_text = _field(row, "prompt", str)
    chosen, rejected = _field(row, "chosen", str), _field(row, "rejected", str)
    prompt = _hh_prompt(prompt_text)
    if prompt is None:
        prompt = [Message(role="user", content=prompt_text)]
    else:  # the responses continue "Assistant:" and so start with the space _split_hh drops
        chosen, rejected = chosen.removeprefix(" "), rejected.removeprefix(" ")
    return prompt, [Message(role="assistant", content=chosen)], [Message(role="assistant", content=rejected)]


def _with_system(prompt: list[Message], row: dict[str, Any]) -> list[Message]:
    """Put the row's ``system`` column (if any, non-empty) in front of the prompt as a system message."""
    system = row.get("system")
    if system is None:
        return prompt
    if not isinstance(system, str):
        raise _BadRow(f"'system' must be a str, got {type(system).__name__}")
    if not system.strip():
        return prompt
    if prompt and prompt[0].role == "system":
        raise _BadRow("the row has both a 'system' column and a system turn in its prompt")
    return [Message(role="system", content=system), *prompt]


def parse_row(row: dict[str, Any], fmt: str) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt messages, chosen response messages, rejected response messages) of one row; raises _BadRow."""
    if fmt == "explicit":
        prompt, chosen, rejected = _explicit(row)
    elif fmt == "conversational":
        prompt = _messages(_field(row, "prompt", list), "prompt")
        chosen = _messages(_field(row, "chosen", (list, dict)), "chosen")
        rejected = _messages(_field(row, "rejected", (list, dict)), "rejected")
    elif fmt in ("implicit", "hh"):
        if fmt == "implicit":
            full_chosen = _messages(_field(row, "chosen", list), "chosen")
            full_rejected = _messages(_field(row, "rejected", list), "rejected")
        else:
            full_chosen = _split_hh(_field(row, "chosen", str), "chosen")
            full_rejected = _split_hh(_field(row, "rejected", str), "rejected")
        prompt, chosen, rejected = _split_shared_prefix(full_chosen, full_rejected)
        if not prompt:
            raise _BadRow("chosen and rejected share no prompt turn")
    else:
        raise ValueError(f"unknown format '{fmt}'; expected one of {FORMATS} or 'auto'")
    prompt = _with_system(prompt, row)

    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response:
            raise _BadRow(f"{name} response is empty")
        if response[-1].role != "assistant":
            raise _BadRow(f"{name} response must end with an assistant turn, got '{response[-1].role}'")
        if not "".join(m.text_content for m in response).strip():
            raise _BadRow(f"{name} response is empty")
    if [m.text_content for m in chosen] == [m.text_content for m in rejected]:
        raise _BadRow("chosen and rejected are identical")
    return prompt, chosen, rejected


def _map_columns(raw: dict[str, Any], column_map: dict[str, str]) -> dict[str, Any]:
    """The row under our column names: a mapped column replaces a column that already has our name."""
    row = {k: v for k, v in raw.items() if k not in column_map and k not in column_map.values()}
    for ours, theirs in column_map.items():
        if theirs not in raw:
            raise _BadRow(f"column_map['{ours}'] names column '{theirs}', which this row does not have")
        row[ours] = raw[theirs]
    return row


# ------------------------------------------------------------------------------------- tokenize and truncate


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


def _tokenize_messages(tokenizer: ModelTokenizer, messages: list[Message], end: bool) -> tuple[list[int], list[bool]]:
    parameters = inspect.signature(tokenizer.tokenize_messages).parameters
    switch = next((name for name in _END_SWITCHES if name in parameters), None)
    if switch is None:
        check_tokenizer(tokenizer)  # raises, naming the tokenizer
    try:
        return tokenizer.tokenize_messages(messages, **{switch: end})
    except (ValueError, RuntimeError) as error:  # e.g. Mistral's template has no system turn
        raise _BadRow(f"{type(tokenizer).__name__} cannot format these messages: {error}") from None


def tokenize_chat(tokenizer: ModelTokenizer, messages: list[Message]) -> tuple[list[int], list[bool]]:
    """``messages`` (ending with the assistant's response) in the tokenizer's chat format with the family's end
    tokens on: (token ids, masked flags), whatever the family calls the switch and whatever its default (Phi-3
    and Phi-4 default to off, which leaves a response without its end of turn).

    The response then ends as the family trains it: Llama 3 <|eot_id|> (and a masked <|end_of_text|>), Qwen2/2.5
    and Phi-4 <|im_end|>, Phi-3 <|end|> + <|endoftext|>, Llama 2, Mistral and Gemma </s>.
    """
    return _tokenize_messages(tokenizer, messages, end=True)


def generation_prompt(tokenizer: ModelTokenizer, prompt: list[Message]) -> list[int]:
    """The prompt in chat format followed by the assistant header: what a model is given at generation time.

    Found as the common start of the prompt followed by different assistant responses, so it holds for every
    family's format (an empty assistant turn would leave Phi-3's <|end|> in it).
    """
    messages = [Message(m.role, m.content, masked=True) for m in prompt]
    probes = [tokenize_chat(tokenizer, messages + [Message("assistant", text)])[0] for text in _PROBES]
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


def _tokenize(
    tokenizer: ModelTokenizer, prompt: list[Message], response: list[Message], header: list[int]
) -> tuple[list[int], list[int], list[bool]]:
    """(prompt ids, response ids, response masked flags) for prompt + response in the tokenizer's chat format.

    The response starts after ``header`` (:func:`generation_prompt`: as in TRL, and as generation sees it), so
    the assistant header is not trained and not counted in length-averaged losses. Should the header not be a
    prefix (a response that starts with a tool turn, an unusual template), it starts at the first unmasked token
    (torchtune's rule).
    """
    messages = [Message(m.role, m.content, masked=True) for m in prompt]
    messages += [Message(m.role, m.content, masked=False) for m in response]
    tokens, mask = tokenize_chat(tokenizer, messages)
    start = mask.index(False)
    if tokens[: len(header)] == header and not all(mask[len(header) :]):
        start = max(start, len(header))
    return tokens[:start], tokens[start:], mask[start:]


def _word_starts(text: str) -> list[int]:
    """Offsets where a word starts (after whitespace); every character offset for text without spaces."""
    starts = [i for i in range(1, len(text)) if text[i - 1].isspace() and not text[i].isspace()]
    return starts or list(range(1, len(text)))


def _shorten_prompt(tokenizer: ModelTokenizer, prompt: list[Message], max_prompt_length: int) -> list[Message]:
    """The prompt cut to at most ``max_prompt_length`` tokens (generation prompt included), keeping its end.

    Whole turns go first, the oldest exchange first (so the prompt still starts with a user turn, as strict
    templates require); the system turn is kept. If the latest turn alone is too long, the start of its text is
    cut at a word boundary, so no chat header and no character is ever cut in half.
    """
    system = [m for m in prompt[:1] if m.role == "system"]
    body = prompt[len(system) :]
    length = lambda turns: len(generation_prompt(tokenizer, system + turns))
    while len(body) > 1 and length(body) > max_prompt_length:
        body = body[1:]
        while len(body) > 1 and body[0].role != "user":
            body = body[1:]
    if length(body) <= max_prompt_length:
        return system + body

    turn, rest = body[0], body[1:]
    text = turn.text_content
    cut = lambda offset: [Message(turn.role, text[offset:])] + rest
    if length(cut(len(text))) > max_prompt_length:
        what = "chat format and system turn" if system else "chat format"
        raise _BadRow(
            f"the prompt needs {length(cut(len(text)))} tokens for its {what} alone, more than "
            f"max_prompt_length={max_prompt_length}; raise max_prompt_length",
            f"the prompt's {what} alone exceed max_prompt_length={max_prompt_length}",
        )
    starts = _word_starts(text)
    if length(cut(starts[-1])) > max_prompt_length:  # even the last word is too long: cut inside it
        starts = list(range(starts[-1] + 1, len(text) + 1))
    lo, hi = 0, len(starts) - 1  # binary search for the earliest start that fits (the longest kept text)
    while lo < hi:
        mid = (lo + hi) // 2
        if length(cut(starts[mid])) <= max_prompt_length:
            hi = mid
        else:
            lo = mid + 1
    return cut(starts[lo])


class PreferenceDataset(Dataset):
    """Tokenized preference pairs. Item i is a dict of token lists:

    ``prompt_ids``, ``chosen_labels``, ``rejected_labels`` (response token ids, -100 where the tokenizer masks a
    token, e.g. a trailing end-of-text), and ``index`` (i). ``input_ids`` of a side are ``prompt_ids`` followed
    by that side's response ids; :func:`collate_preference_batch` assembles them.
    ``skipped`` counts skipped rows by reason; ``source`` names where the rows came from, and ``row_numbers[i]``
    is sample i's row there (for messages).
    """

    def __init__(
        self,
        samples: list[dict[str, Any]],
        source: str,
        skipped: Counter | None = None,
        row_numbers: list[int] | None = None,
    ) -> None:
        self._samples = samples
        self._content_hash: str | None = None  # computed once: the fingerprint and the reference cache both ask
        self.source = source
        self.skipped = skipped or Counter()
        self.row_numbers = row_numbers if row_numbers is not None else list(range(len(samples)))

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self._samples[index], "index": index}

    def content_hash(self) -> str:
        """SHA-256 of every sample's token ids and labels, in order: equal exactly when the tokenized data is
        (dataset, tokenizer, chat template and truncation settings all end up in it)."""
        if self._content_hash is None:
            digest = hashlib.sha256()
            for sample in self._samples:
                fields = [sample[k] for k in ("prompt_ids", "chosen_response_ids", "chosen_labels",
                                              "rejected_response_ids", "rejected_labels")]  # fmt: skip
                digest.update(json.dumps(fields, separators=(",", ":")).encode())
            self._content_hash = digest.hexdigest()
        return self._content_hash

    def sample_lengths(self) -> list[int]:
        """Prompt + longer response, per sample: the padded length the sample needs."""
        return [
            len(s["prompt_ids"]) + max(len(s["chosen_response_ids"]), len(s["rejected_response_ids"]))
            for s in self._samples
        ]


def _tokenize_pair(
    tokenizer: ModelTokenizer,
    row: dict[str, Any],
    fmt: str,
    max_length: int,
    max_prompt_length: int | None,
) -> dict[str, list[int]]:
    """One parsed, tokenized and truncated pair (the sample dict of :class:`PreferenceDataset`)."""
    prompt, chosen, rejected = parse_row(row, fmt)

    def tokenize(prompt: list[Message]) -> tuple:
        header = generation_prompt(tokenizer, prompt)
        prompt_ids, chosen_ids, chosen_masked = _tokenize(tokenizer, prompt, chosen, header)
        prompt_ids_r, rejected_ids, rejected_masked = _tokenize(tokenizer, prompt, rejected, header)
        if prompt_ids != prompt_ids_r:
            raise _BadRow("chosen and rejected tokenize to different prompts")
        return prompt_ids, chosen_ids, chosen_masked, rejected_ids, rejected_masked

    prompt_ids, chosen_ids, chosen_masked, rejected_ids, rejected_masked = tokenize(prompt)
    truncated = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > max_length
    if truncated:
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt = _shorten_prompt(tokenizer, prompt, max_prompt_length)
            prompt_ids, chosen_ids, chosen_masked, rejected_ids, rejected_masked = tokenize(prompt)
        budget = max_length - len(prompt_ids)
        if budget < 1:
            raise _BadRow(
                f"prompt of {len(prompt_ids)} tokens leaves no room for a response within max_length={max_length}; "
                "set max_prompt_length to truncate long prompts",
                f"prompt leaves no room for a response within max_length={max_length}",
            )
        chosen_ids, chosen_masked = chosen_ids[:budget], chosen_masked[:budget]
        rejected_ids, rejected_masked = rejected_ids[:budget], rejected_masked[:budget]
    if chosen_ids == rejected_ids:
        if truncated:
            raise _BadRow(f"chosen and rejected are identical after truncation to {max_length} tokens")
        raise _BadRow("chosen and rejected tokenize identically (their texts differ only in what the chat format "
                      "drops, e.g. surrounding whitespace)")  # fmt: skip
    return {
        "prompt_ids": prompt_ids,
        "chosen_response_ids": chosen_ids,
        "chosen_labels": _labels(chosen_ids, chosen_masked),
        "rejected_response_ids": rejected_ids,
        "rejected_labels": _labels(rejected_ids, rejected_masked),
    }


def tokenize_rows(
    rows: Sequence[dict[str, Any]],
    tokenizer: ModelTokenizer,
    *,
    source: str,
    row_numbers: Sequence[int] | None = None,
    describe_row: Callable[[int], str] | None = None,
    format: str = "auto",
    column_map: dict[str, str] | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
) -> PreferenceDataset:
    """Parse, tokenize and truncate ``rows`` (dicts) into a :class:`PreferenceDataset`.

    ``row_numbers`` are the rows' positions in ``source`` for error messages (default 0..n-1), and
    ``describe_row(number)`` says where that is (default ``"row N"``). ``column_map`` maps our names (prompt /
    chosen / rejected / system) to the rows' column names.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got '{on_bad_row}'")
    check_tokenizer(tokenizer)
    if format not in (*FORMATS, "auto"):
        raise ValueError(f"unknown format '{format}'; expected one of {FORMATS} or 'auto'")
    column_map = dict(column_map or {})
    unknown = sorted(set(column_map) - set(COLUMNS))
    if unknown:
        raise ValueError(f"column_map keys must be among {COLUMNS} (ours -> the data's column), got {unknown}")
    max_length = max_length or getattr(tokenizer, "max_seq_len", None)
    if not max_length:
        raise ValueError("set max_length (or the tokenizer's max_seq_len): the longest prompt + response in tokens")
    if max_prompt_length is not None and not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"max_prompt_length={max_prompt_length} must be in [1, max_length={max_length}) so that every "
            "sample keeps at least one response token"
        )
    row_numbers = list(row_numbers) if row_numbers is not None else list(range(len(rows)))
    describe_row = describe_row or (lambda number: f"row {number}")

    samples, kept_rows, skipped = [], [], Counter()
    # The tokenizer's own max_seq_len would cut chosen and rejected independently (and could cut a whole
    # response away); truncation is ours, so switch it off while tokenizing.
    tokenizer_max_seq_len = getattr(tokenizer, "max_seq_len", None)
    tokenizer.max_seq_len = None
    try:
        for number, raw in zip(row_numbers, rows):
            try:
                row = _map_columns(raw, column_map)
                fmt = detect_format(row) if format == "auto" else format
                if fmt is None:
                    raise _BadRow(
                        f"cannot detect the preference format from columns {sorted(row)} (chosen: "
                        f"{type(row.get('chosen')).__name__}); set format to one of {FORMATS}, and column_map "
                        "if the columns are named differently",
                        "the preference format cannot be detected",
                    )
                samples.append(_tokenize_pair(tokenizer, row, fmt, max_length, max_prompt_length))
                kept_rows.append(number)
            except _BadRow as bad:
                if on_bad_row == "error":
                    raise PreferenceDataError(
                        f"{source} {describe_row(number)}: {bad} (set on_bad_row: skip to skip such rows)"
                    ) from None
                skipped[bad.summary] += 1
    finally:
        tokenizer.max_seq_len = tokenizer_max_seq_len
    if skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in skipped.most_common())
        if not samples:
            raise PreferenceDataError(f"{source}: all {len(rows)} rows were skipped as bad: {reasons}")
        log.warning("%s: skipped %d of %d rows: %s", source, sum(skipped.values()), len(rows), reasons)
    return PreferenceDataset(samples, source, skipped, kept_rows)


def _labels(ids: list[int], masked: list[bool]) -> list[int]:
    """Response token ids with the tokenizer's masked positions (e.g. a trailing end-of-text) set to -100."""
    return [IGNORE_INDEX if m else tok for tok, m in zip(ids, masked)]


# ------------------------------------------------------------------------------------------------ builder


def _files(data_files: str | Sequence[str] | dict[str, Any] | None) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for files in data_files.values() for f in _files(files)]
    return [str(f) for f in data_files]


def _is_empty(path: str) -> bool:
    """True for a local file that holds no rows: nothing but whitespace, a CSV header, ``[]``, or 0 parquet rows."""
    file = Path(path)
    if not file.is_file():
        return False
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(file).num_rows == 0
    lines = []
    with open(file, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                lines.append(line.strip())
                if len(lines) == 2:
                    break
    header_only = file.suffix in (".csv", ".tsv") and len(lines) == 1
    return not lines or header_only or lines == ["[]"]


def _load_split(source: str, data_files: Any, split: str, **kwargs: Any) -> tuple[HFDataset | None, list[int]]:
    """The rows of ``split`` (None if it selects none) and each row's index in its unsliced split
    (``"train[4:6]"`` gives rows 4 and 5)."""
    try:
        instructions = ReadInstruction.from_spec(split)
    except (ValueError, AssertionError):  # a split name the spec grammar does not take: load it as it is
        rows = load_dataset(source, data_files=data_files, split=split, **kwargs)
        return rows, list(range(len(rows)))
    full: dict[str, HFDataset] = {}
    parts, numbers = [], []
    for name in dict.fromkeys(i.splitname for i in instructions._relative_instructions):
        full[name] = load_dataset(source, data_files=data_files, split=name, **kwargs)
    for part in instructions.to_absolute({name: len(rows) for name, rows in full.items()}):
        if part.to > part.from_:
            parts.append(full[part.splitname].select(range(part.from_, part.to)))
            numbers += range(part.from_, part.to)
    return (concatenate_datasets(parts) if parts else None), numbers


def _line_describer(data_files: Any) -> Callable[[int], str]:
    """``describe_row`` for error messages: "row N" (0-based in the split), plus the 1-based line of that row
    in a single JSON-lines or CSV file (computed only when an error is reported)."""
    files = _files(data_files)
    path = Path(files[0]) if len(files) == 1 else None
    if path is None or not path.is_file() or path.suffix not in (".jsonl", ".json", ".csv"):
        return lambda number: f"row {number}"

    def describe(number: int) -> str:
        line = _line_of_row(path, number)
        return f"row {number}" if line is None else f"row {number} (line {line})"

    return describe


def _line_of_row(path: Path, index: int) -> int | None:
    """The 1-based line where row ``index`` starts; blank lines are skipped, as ``datasets`` skips them."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        if path.suffix == ".csv":
            reader, row, end = csv.reader(f), -1, 0  # row -1: the header
            for record in reader:
                start, end = end + 1, reader.line_num
                if not record:
                    continue
                if row == index:
                    return start
                row += 1
            return None
        row = -1
        for number, line in enumerate(f, 1):
            if row == -1 and line.lstrip().startswith("["):
                return None  # a JSON array, not JSON lines
            if line.strip():
                row += 1
                if row == index:
                    return number
    return None


def preference_dataset(
    tokenizer: ModelTokenizer,
    *,
    source: str,
    data_files: str | list[str] | None = None,
    split: str = "train",
    format: str = "auto",
    column_map: dict[str, str] | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
    holdout_fraction: float = 0.0,
    part: Literal["train", "heldout"] = "train",
    holdout_seed: int = 0,
    **load_dataset_kwargs: Any,
) -> PreferenceDataset:
    """Load preference pairs with ``datasets.load_dataset`` and tokenize them (a YAML ``_component_``).

    Args:
        tokenizer: a torchtune ``ModelTokenizer`` (``tokenize_messages`` in the model's chat format).
        source: ``"json"``, ``"parquet"``, ``"csv"`` (with ``data_files``) or a Hugging Face hub dataset name.
        data_files: local file(s) for the file sources.
        split: the named split to read, e.g. ``"train"`` or ``"test_prefs"``; slicing (``"train[:90%]"``) works,
            and errors name rows by their index in the whole split.
        format: one of ``explicit``, ``conversational``, ``implicit``, ``hh`` or ``auto`` (detect per row).
        column_map: our column name (prompt, chosen, rejected, system) -> the data's, e.g.
            ``{"chosen": "response_j"}``. The mapped column wins over a column already named ``chosen``.
        max_length: longest prompt + response in tokens (default: the tokenizer's ``max_seq_len``).
        max_prompt_length: prompts longer than this are cut (oldest turns first, keeping the end) when a sample
            is too long. ``None`` never cuts prompts: a prompt that leaves no room for a response is a bad row.
        on_bad_row: ``"error"`` (default) raises naming the row; ``"skip"`` skips and logs a summary.
        holdout_fraction: hold out this fraction of the split's rows (seeded by ``holdout_seed``) as an eval set.
        part: ``"train"`` for the remaining rows, ``"heldout"`` for the held-out ones.
        **load_dataset_kwargs: passed to ``datasets.load_dataset`` (``name``, ``data_dir``, ``revision``, ...).
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    if part not in ("train", "heldout"):
        raise ValueError(f"part must be 'train' or 'heldout', got '{part}'")
    if part == "heldout" and holdout_fraction == 0.0:
        raise ValueError("part='heldout' needs holdout_fraction > 0 (or point an eval dataset at its own split)")
    where = f"{data_files if data_files is not None else source} (split '{split}')"
    try:
        rows, numbers = _load_split(source, data_files, split, **load_dataset_kwargs)
    except Exception as error:  # datasets fails on empty files with StopIteration, ValueError or its own errors
        empty = [f for f in _files(data_files) if _is_empty(f)]
        if empty:
            raise PreferenceDataError(f"{', '.join(empty)}: the file holds no rows") from error
        raise
    if not numbers:
        raise PreferenceDataError(f"{where}: no rows")
    for ours, theirs in (column_map or {}).items():
        if theirs not in rows.column_names:
            raise PreferenceDataError(
                f"{where}: column_map['{ours}'] names column '{theirs}', which is not among its columns "
                f"{rows.column_names}"
            )
        if ours in rows.column_names and ours not in (column_map or {}).values():
            log.info("%s: column '%s' is not used: column_map takes '%s' from '%s'", where, ours, ours, theirs)

    if holdout_fraction:
        permuted = np.random.default_rng(holdout_seed).permutation(len(rows))
        n_heldout = max(1, round(holdout_fraction * len(rows)))
        positions = np.sort(permuted[:n_heldout] if part == "heldout" else permuted[n_heldout:]).tolist()
        rows, numbers = rows.select(positions), [numbers[i] for i in positions]
        where += f" {part} part"
    return tokenize_rows(
        rows,
        tokenizer,
        source=where,
        row_numbers=numbers,
        describe_row=_line_describer(data_files),
        format=format,
        column_map=column_map,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        on_bad_row=on_bad_row,
    )


# ----------------------------------------------------------------------------------------------- collator


def collate_preference_batch(
    batch: list[dict[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = IGNORE_INDEX,
    pad_to_multiple_of: int = 1,
) -> dict[str, torch.Tensor]:
    """Pad B pairs into one [2B, L] batch for a single concatenated forward: chosen rows first, then rejected.

    Returns ``input_ids`` and ``labels`` (right-padded with ``padding_idx`` / ``ignore_idx``; prompt positions
    are ``ignore_idx`` in ``labels``), ``lengths`` [2B] (tokens before padding) and ``index`` [B], the samples'
    dataset indices.
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
    return {"input_ids": input_ids, "labels": label_ids, "lengths": lengths, "index": index}
