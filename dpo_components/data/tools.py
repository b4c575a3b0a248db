"""Tool use in preference rows: the ``tools`` column, assistant tool calls, tool results, and how each family's
released chat template writes them.

A row may carry ``tools``: a list of JSON-schema function definitions, TRL's convention (OpenAI's
``{"type": "function", "function": {"name", "description", "parameters"}}`` or the bare ``{"name", ...}``; a JSON
string of that list is read too). Its messages may hold

- an assistant turn with ``tool_calls``: ``[{"type": "function", "function": {"name", "arguments"}}]`` (or
  ``{"name", "arguments"}``); ``arguments`` an object, or a JSON string of one (OpenAI's form), which is parsed so
  that every family writes the object (Qwen3's template would write such a string as given);
- a tool result: a ``tool`` (or ``ipython``) turn; a content that is not a string is written as JSON (Qwen's
  templates would print a Python dict).

A call travels inside torchtune's ``Message`` as a content part ``{"type": "tool_call", "name", "arguments"}``
(``text_content`` leaves it out, so families without tool support see only text, and refuse: chat.py).

What the released templates write (read from their Jinja; checked token for token in
``tests/components/test_tool_data.py``):

- **Llama 3.1 / 3.2 / 3.3 Instruct** (tools in the first user message, the templates' default): the system block
  starts with ``Environment: ipython\\n``; the first user turn is :data:`LLAMA3_TOOLS_PREAMBLE`, each tool as JSON
  indented by 4 and ``\\n\\n``, then the user's text; a call is the assistant turn ``{"name": ..., "parameters":
  ...}`` (its text content dropped); a result is an ``ipython`` turn holding the result JSON-encoded (a string
  result is written quoted). One call per assistant turn: parallel calls are a row the template refuses.
- **Qwen2.5 / Qwen3**: the tools go into the system turn (``# Tools ... <tools>`` one JSON object a line), after the
  row's system text (Qwen2.5: its default system text when the row has none); calls are ``<tool_call>`` blocks
  after the turn's text; consecutive results merge into one ``user`` turn of ``<tool_response>`` blocks.
"""

from __future__ import annotations

import json
from typing import Any

from torchtune.data import Message

from dpo_components.data.errors import BadRow

TOOL_CALL = "tool_call"  # the content part type of a call inside a Message


def to_json(value: Any, indent: int | None = None) -> str:
    """The templates' ``tojson`` filter (transformers' own: ``json.dumps`` with ``ensure_ascii=False``)."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def tool_name(tool: Any) -> str | None:
    """The name a tool definition declares (OpenAI's nested form or the bare one), else None."""
    if not isinstance(tool, dict):
        return None
    function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    name = function.get("name")
    return name if isinstance(name, str) and name else None


def parse_tools(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The row's ``tools`` column as a list of definitions ([] without one); raises BadRow for a malformed one."""
    tools = row.get("tools")
    if tools is None or tools == "" or tools == []:
        return []
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise BadRow(f"'tools' is a string that is not JSON ({error.msg}, column {error.colno})",
                         "'tools' is not JSON") from None  # fmt: skip
    if not isinstance(tools, list):
        raise BadRow(f"'tools' must be a list of function definitions, got {type(tools).__name__}",
                     "'tools' is not a list")  # fmt: skip
    for i, tool in enumerate(tools):
        if tool_name(tool) is None:
            raise BadRow(f"'tools'[{i}] is not a function definition with a name ({{'type': 'function', "
                         f"'function': {{'name', 'parameters'}}}} or {{'name', 'parameters'}}): {tool!r:.80}",
                         "a tool definition has no name")  # fmt: skip
    return tools


def tool_call_parts(calls: Any, where: str) -> list[dict[str, Any]]:
    """A message's ``tool_calls`` as content parts ``{"type": "tool_call", "name", "arguments"}``."""
    if not isinstance(calls, list):
        raise BadRow(f"{where} 'tool_calls' must be a list, got {type(calls).__name__}",
                     "'tool_calls' is not a list")  # fmt: skip
    parts = []
    for i, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise BadRow(f"{where} tool call {i} has no function name: {call!r:.80}", "a tool call has no name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as error:
                raise BadRow(f"{where} tool call {i} ({name}): its arguments are not JSON ({error.msg}, column "
                             f"{error.colno}): {arguments!r:.80}", "a tool call's arguments are not JSON") from None
        if not isinstance(arguments, dict):
            raise BadRow(f"{where} tool call {i} ({name}): its arguments must be a JSON object, got "
                         f"{type(arguments).__name__}", "a tool call's arguments are not a JSON object")  # fmt: skip
        parts.append({"type": TOOL_CALL, "name": name, "arguments": arguments})
    return parts


def tool_calls(message: Message) -> list[dict[str, Any]]:
    """The calls a message makes (content parts of type ``tool_call``)."""
    return [part for part in message.content if part.get("type") == TOOL_CALL]


def uses_tools(messages: list[Message]) -> bool:
    return any(m.role == "ipython" or tool_calls(m) for m in messages)


def with_text(message: Message, text: str) -> Message:
    """``message`` with its text replaced (its images, first, its calls, and a structured result's JSON flag,
    kept)."""
    structured = any(part.get("json") for part in message.content)
    images = [part for part in message.content if part["type"] == "image"]
    content = [*images, {"type": "text", "content": text, **({"json": True} if structured else {})},
               *tool_calls(message)]  # fmt: skip
    return Message(message.role, content, masked=message.masked,
                   ipython=message.ipython, eot=message.eot)  # fmt: skip


def message_dicts(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as ``{"role", "content"}`` dicts again (what a reward model and a written round are given): tool
    results as role ``tool``, calls as OpenAI-style ``tool_calls``."""
    out = []
    for m in messages:
        entry: dict[str, Any] = {"role": "tool" if m.role == "ipython" else m.role, "content": m.text_content}
        if calls := tool_calls(m):
            entry["tool_calls"] = [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                                   for c in calls]  # fmt: skip
        out.append(entry)
    return out


def check_tool_use(messages: list[Message], tools: list[dict[str, Any]]) -> None:
    """Every call names a tool of the row's ``tools``, and every tool result follows a call (directly, or after
    other results of the same calls); raises BadRow naming the first that does not."""
    defined = {tool_name(t) for t in tools}
    pending = 0  # calls of the latest assistant turn not yet answered
    for i, message in enumerate(messages):
        calls = tool_calls(message)
        for call in calls:
            if call["name"] not in defined:
                known = ", ".join(sorted(defined)) if defined else "none: the row has no 'tools'"
                raise BadRow(f"turn {i} calls tool '{call['name']}', which the row's 'tools' does not define "
                             f"(defined: {known})", "a tool call names a tool 'tools' does not define")  # fmt: skip
        if message.role == "ipython":
            if pending == 0:
                raise BadRow(f"turn {i} is a tool result with no tool call before it",
                             "a tool result has no call before it")  # fmt: skip
            pending -= 1
        else:
            pending = len(calls)


# -------------------------------------------------------------------------------------- the families' renderings

LLAMA3_TOOLS_PREAMBLE = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    'best answers the given prompt.\n\nRespond in the format {"name": function name, "parameters": dictionary of '
    "argument name and its value}.Do not use variables.\n\n"
)


def llama3_tools_text(tools: list[dict[str, Any]]) -> str:
    """The first user turn's start when a row has tools (Llama 3.1+'s ``tools_in_user_message``)."""
    return LLAMA3_TOOLS_PREAMBLE + "".join(to_json(tool, indent=4) + "\n\n" for tool in tools)


def llama3_call_text(message: Message) -> str:
    """An assistant tool-call turn's text in Llama 3.1+'s JSON custom-tool form (the turn's text dropped)."""
    calls = tool_calls(message)
    if len(calls) != 1:
        raise ValueError(f"an assistant turn with {len(calls)} tool calls: Llama 3.1+'s template supports one call "
                         "per turn (\"This model only supports single tool-calls at once!\")")  # fmt: skip
    return f'{{"name": "{calls[0]["name"]}", "parameters": {to_json(calls[0]["arguments"])}}}'


def qwen_tools_text(tools: list[dict[str, Any]]) -> str:
    """The ``# Tools`` block Qwen2.5 and Qwen3 write into the system turn."""
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
        "function signatures within <tools></tools> XML tags:\n<tools>"
        + "".join("\n" + to_json(tool) for tool in tools)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        "<args-json-object>}\n</tool_call>"
    )


def qwen_calls_text(text: str, message: Message) -> str:
    """An assistant turn's text followed by its ``<tool_call>`` blocks, a newline between each."""
    blocks = [f'<tool_call>\n{{"name": "{c["name"]}", "arguments": {to_json(c["arguments"])}}}\n</tool_call>'
              for c in tool_calls(message)]  # fmt: skip
    return "\n".join([text, *blocks] if text else blocks)


def qwen_merge_results(messages: list[Message]) -> list[Message]:
    """Consecutive tool results as one ``user`` turn of ``<tool_response>`` blocks (Qwen2.5 / Qwen3)."""
    out: list[Message] = []
    for message in messages:
        if message.role != "ipython":
            out.append(message)
            continue
        block = f"<tool_response>\n{message.text_content}\n</tool_response>"
        previous = out[-1] if out else None
        if previous is not None and getattr(previous, "tool_results", False):
            previous.content = [{"type": "text", "content": previous.text_content + "\n" + block}]
        else:
            merged = Message("user", block, masked=message.masked)
            merged.tool_results = True  # what the next result merges into
            out.append(merged)
    return out
