"""Preference row formats: a dataset row turned into (prompt, chosen, rejected) messages.

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

Unpaired feedback (KTO; ``dpo_components.data.unpaired_dataset``) has rows ``prompt``, ``completion`` and ``label``
(a bool: true for a desirable completion, false for an undesirable one), as TRL's unpaired preference format: the
prompt and completion strings (``explicit``) or message lists (``conversational``). :func:`parse_unpaired_row`
reads them; a paired row of any format above is unrolled into its two unpaired rows.

A message is ``{"role", "content"}`` or ShareGPT's ``{"from", "value"}`` (roles human/gpt/system); its content a
string or an OpenAI-style list of text parts ``[{"type": "text", "text": ...}]`` (joined). A ``system`` column
(or ``column_map["system"]``) becomes a system message at the start of the prompt.

Tool use (:mod:`dpo_components.data.tools`): a ``tools`` column, assistant messages with ``tool_calls``, and tool
results (role ``tool`` or ``ipython``) in prompts and completions. A tool result's content that is not a string is
written as JSON; an assistant message with calls may have no content.
"""

from __future__ import annotations

import json
import re
from typing import Any

from torchtune.data import Message

from dpo_components.data.errors import BadRow, PreferenceDataError  # noqa: F401 (re-exported: its home before errors.py)
from dpo_components.data.tools import tool_call_parts, tool_calls

FORMATS = ("explicit", "conversational", "implicit", "hh")
COLUMNS = ("prompt", "chosen", "rejected", "system", "completion", "label", "tools")  # the names column_map maps from
_ROLES = {
    "system": "system", "user": "user", "assistant": "assistant", "ipython": "ipython", "tool": "ipython",
    "human": "user", "gpt": "assistant", "model": "assistant",  # ShareGPT, Gemma
}  # fmt: skip
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


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
        raise BadRow(f"missing '{key}' (no such column, or a null value)")
    value = row[key]
    if not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join(k.__name__ for k in kinds)
        raise BadRow(f"'{key}' must be a {expected}, got {type(value).__name__}")
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
                raise BadRow(f"{where} has a content part of type '{kind}'; only text parts are supported",
                              "a message has a non-text content part")  # fmt: skip
        return "".join(texts)
    raise BadRow(f"{where} content must be a string or a list of text parts, got {type(value).__name__}",
                  "a message has malformed content")  # fmt: skip


def _messages(value: list[Any] | dict[str, Any], key: str) -> list[Message]:
    """Messages in {"role", "content"} or ShareGPT {"from", "value"} form; one message alone is a list of one.
    An assistant message's ``tool_calls`` become content parts (:func:`~dpo_components.data.tools.tool_call_parts`)."""
    messages = []
    for i, m in enumerate([value] if isinstance(value, dict) else value):
        where = f"'{key}'[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role", m.get("from")), str):
            raise BadRow(f"{where} must be a {{'role', 'content'}} (or {{'from', 'value'}}) message, got {m!r:.80}",
                          f"'{key}' holds a malformed message")  # fmt: skip
        role = m.get("role", m.get("from"))
        if role not in _ROLES:
            raise BadRow(f"{where} has unknown role '{role}' (expected one of {sorted(_ROLES)})")
        role, content, calls = _ROLES[role], m.get("content", m.get("value")), m.get("tool_calls")
        if role == "ipython" and not isinstance(content, str) and content is not None:  # a structured result
            messages.append(Message(role=role, content=[{"type": "text", "json": True,
                                                         "content": json.dumps(content, ensure_ascii=False)}]))
            continue
        if calls and role != "assistant":
            raise BadRow(f"{where} is a '{role}' turn with 'tool_calls'; only assistant turns call tools",
                         "a non-assistant turn has 'tool_calls'")  # fmt: skip
        if calls and content is None:
            content = ""
        parts = tool_call_parts(calls, where) if calls else []
        text = _content(content, where)
        messages.append(Message(role=role, content=[{"type": "text", "content": text}, *parts] if parts else text))
    return messages


def turn_key(message: Message) -> tuple[Any, ...]:
    """What a turn says: role, text and calls (equal turns are the same turn of a conversation)."""
    return message.role, message.text_content, json.dumps(tool_calls(message), sort_keys=True)


def _split_hh(text: str, key: str) -> list[Message]:
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if parts[0].strip() or len(parts) < 3:
        raise BadRow(f"'{key}' is not in HH-RLHF form ('\\n\\nHuman: ...\\n\\nAssistant: ...')")
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
        if turn_key(a) != turn_key(b):
            break
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise BadRow("chosen and rejected are identical")
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
        raise BadRow(f"'system' must be a str, got {type(system).__name__}")
    if not system.strip():
        return prompt
    if prompt and prompt[0].role == "system":
        raise BadRow("the row has both a 'system' column and a system turn in its prompt")
    return [Message(role="system", content=system), *prompt]


def _check_response(name: str, response: list[Message]) -> None:
    if not response:
        raise BadRow(f"{name} response is empty")
    if response[-1].role != "assistant":
        raise BadRow(f"{name} response must end with an assistant turn, got '{response[-1].role}'")
    if not "".join(m.text_content for m in response).strip() and not any(tool_calls(m) for m in response):
        raise BadRow(f"{name} response is empty")


def parse_row(row: dict[str, Any], fmt: str) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt messages, chosen response messages, rejected response messages) of one row; raises BadRow."""
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
            raise BadRow("chosen and rejected share no prompt turn")
    else:
        raise ValueError(f"unknown format '{fmt}'; expected one of {FORMATS} or 'auto'")
    prompt = _with_system(prompt, row)

    for name, response in (("chosen", chosen), ("rejected", rejected)):
        _check_response(name, response)
    if [turn_key(m) for m in chosen] == [turn_key(m) for m in rejected]:
        raise BadRow("chosen and rejected are identical")
    return prompt, chosen, rejected


def detect_unpaired_format(row: dict[str, Any]) -> str | None:
    """``explicit`` or ``conversational`` for an unpaired row (one with a ``completion`` column), from the types."""
    completion = row.get("completion")
    if isinstance(completion, (list, dict)):
        return "conversational"
    return "explicit" if isinstance(completion, str) else None


def parse_unpaired_row(row: dict[str, Any], fmt: str) -> tuple[list[Message], list[Message], bool]:
    """(prompt messages, completion messages, label) of one unpaired row, ``fmt`` explicit or conversational;
    raises BadRow. The label must be a bool (true: desirable), as in TRL's unpaired format: 0/1 or "yes" are
    refused rather than guessed."""
    if row.get("label") is None:
        raise BadRow("missing 'label' (no such column, or a null value); an unpaired row needs a bool label "
                     "(true: desirable, false: undesirable)", "missing 'label'")  # fmt: skip
    label = row["label"]
    if not isinstance(label, bool) and type(label).__name__ != "bool_":  # numpy's bool from some readers
        raise BadRow(f"'label' must be a bool (true: desirable, false: undesirable), got {type(label).__name__} "
                     f"{label!r:.40}", "'label' is not a bool")  # fmt: skip
    if fmt == "explicit":
        prompt_text, completion_text = _field(row, "prompt", str), _field(row, "completion", str)
        prompt = _hh_prompt(prompt_text)
        if prompt is None:
            prompt = [Message(role="user", content=prompt_text)]
        else:
            completion_text = completion_text.removeprefix(" ")
        completion = [Message(role="assistant", content=completion_text)]
    elif fmt == "conversational":
        prompt = _messages(_field(row, "prompt", list), "prompt")
        completion = _messages(_field(row, "completion", (list, dict)), "completion")
    else:
        raise BadRow(f"unpaired rows come in format explicit or conversational, not '{fmt}'")
    _check_response("completion", completion)
    return _with_system(prompt, row), completion, bool(label)


def map_columns(raw: dict[str, Any], column_map: dict[str, str]) -> dict[str, Any]:
    """The row under our column names: a mapped column replaces a column that already has our name."""
    row = {k: v for k, v in raw.items() if k not in column_map and k not in column_map.values()}
    for ours, theirs in column_map.items():
        if theirs not in raw:
            raise BadRow(f"column_map['{ours}'] names column '{theirs}', which this row does not have")
        row[ours] = raw[theirs]
    return row
