"""Chat formats that torchtune 0.6.1 writes differently from the released models' own chat templates.

Each is torchtune's tokenizer class for the family with ``tokenize_messages`` giving the token ids of the model's
``apply_chat_template`` (checked token for token in ``tests/components/test_chat_templates.py``), so pairs are
tokenized as the Instruct model was tuned and as it is served (vLLM, ``transformers`` pipelines):

- **Gemma 2** (``gemma2_tokenizer``): torchtune's Gemma tokenizer has no chat format at all (turns concatenated
  without markers) and opens every exchange with ``<bos>``. Here: ``<bos>`` once, then
  ``<start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n{text}<end_of_turn>\\n``; no system role.
- **Mistral 7B Instruct v0.3** (``mistral_v0_3_tokenizer``): torchtune writes v0.1's ``[INST] ... [/INST]`` as text,
  which SentencePiece splits into other ids than v0.3's control tokens ``[INST]``/``[/INST]``, and repeats
  ``<s>`` per exchange. Here: ``<s>[INST] {user}[/INST] {assistant}</s>[INST] ...`` with the control tokens, and a
  system message before the last user turn, as v0.3's template puts it.
- **Qwen2.5 Instruct** (``qwen2_5_instruct_tokenizer``): the template's default system turn ("You are Qwen, created
  by Alibaba Cloud. You are a helpful assistant.") when a conversation has none; torchtune leaves it out.
- **Phi-4** (``phi4_tokenizer``): torchtune 0.6.1 defines Phi-4's pre-tokenizer pattern (cl100k's) but splits text
  with GPT-2's, so e.g. "(word" or digit runs can get other ids than Phi-4's own tokenizer gives.

- **ChatML families** (Qwen2.5 here, Qwen3 in :mod:`dpo_components.models.qwen3`; :func:`chatml_tokenize`):
  torchtune encodes a turn's role header (``user\n``) and its content separately, while the template's text is
  tokenized in one piece: with the released 151k-token BPE a content starting with ``\n`` (or `` \n``, ``\t\n``)
  gives ``['\n', '\n']`` where the template gives ``['\n\n']``. Here every turn, the response's too, is encoded in
  one piece, as the template's conversation is. A response starting with blank lines then opens with a token that
  holds the header's newline too (``['assistant', '\n\n\n', 'Soft']``): that token is the response's (trained),
  and the pair's prompt ends before it (the response that does not merge keeps the header's ``\n`` untrained).
- **Llama 3.1 / 3.2 / 3.3 Instruct** (``llama3_1_instruct_tokenizer``): their templates always open with a system
  block ``Cutting Knowledge Date: December 2023\nToday Date: <date>\n\n`` (then the system message, if any); the
  date is settable (``date_string``), "26 Jul 2024" by default (Llama 3.1's and 3.3's default; 3.2's template
  writes the day it is run, which would make a dataset's tokens depend on the day). Llama 3.0 keeps torchtune's
  format.

Tools (a row's ``tools``, tool calls and results) are written as the Llama 3.1+, Qwen2.5 and Qwen3 templates write
them (:mod:`dpo_components.data.tools`); the other families' tokenizers take no ``tools`` and refuse such rows.
A multi-turn response trains its assistant turns' text and end of turn, never a turn's header, with these
tokenizers and Gemma 2's and Mistral's; torchtune's own (Llama 3.0, Llama 2, Phi-3, Phi-4) mask a turn's header
with its body, so an assistant header *inside* a response trains there (the first one, the generation prompt's,
never does).

The end of a trained response is the family's: the end-of-turn marker, then EOS where torchtune appends one
(``add_eos``). The template's newline after the last end-of-turn marker is not part of the response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import regex
from torchtune.data import Message
from torchtune.data._utils import truncate
from torchtune.models.gemma._tokenizer import GemmaTokenizer
from torchtune.models.llama3._tokenizer import Llama3Tokenizer
from torchtune.models.mistral._tokenizer import MistralTokenizer
from torchtune.models.phi4 import phi4_tokenizer as tt_phi4_tokenizer
from torchtune.models.phi4._tokenizer import CL100K_PATTERN, Phi4Tokenizer
from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS, Qwen2_5Tokenizer
from torchtune.modules.transforms.tokenizers import GPT2BaseTokenizer, parse_hf_tokenizer_json

from dpo_components.data.tools import (
    llama3_call_text,
    llama3_tools_text,
    qwen_calls_text,
    qwen_merge_results,
    qwen_tools_text,
    to_json,
    tool_calls,
)

QWEN2_5_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def _with_end(tokens: list[int], mask: list[bool], eos_id: int, add_eos: bool) -> tuple[list[int], list[bool]]:
    if add_eos:
        tokens, mask = [*tokens, eos_id], [*mask, mask[-1]]
    return tokens, mask


class Gemma2Tokenizer(GemmaTokenizer):
    """torchtune's Gemma tokenizer with Gemma 2 Instruct's chat format (see the module docstring)."""

    def tokenize_messages(self, messages: list[Message], *, add_eos: bool = True) -> tuple[list[int], list[bool]]:
        tokens, mask = [self.bos_id], [True]
        for message in messages:
            if message.role == "system":
                raise ValueError("Gemma's chat format has no system role")
            role = "model" if message.role == "assistant" else message.role
            header = self.encode(f"<start_of_turn>{role}\n", add_bos=False, add_eos=False)
            body = self.encode(message.text_content.strip() + "<end_of_turn>\n", add_bos=False, add_eos=False)
            # the model header is what generation is given: it belongs to the (masked) prompt
            tokens += header + body
            mask += [message.masked or message.role == "assistant"] * len(header) + [message.masked] * len(body)
        return _with_end(tokens, mask, self.eos_id, add_eos)


def gemma2_tokenizer(path: str, max_seq_len: int | None = None) -> Gemma2Tokenizer:
    """Gemma 2's tokenizer (``tokenizer.model``) with its Instruct chat format."""
    return Gemma2Tokenizer(path=path, max_seq_len=max_seq_len)


class MistralV3Tokenizer(MistralTokenizer):
    """torchtune's Mistral tokenizer with Mistral 7B Instruct v0.3's chat format (see the module docstring)."""

    def tokenize_messages(self, messages: list[Message], *, add_eos: bool = True) -> tuple[list[int], list[bool]]:
        system = [m.text_content for m in messages[:1] if m.role == "system"]
        turns = messages[len(system) :]
        last_user = max((i for i, m in enumerate(turns) if m.role == "user"), default=-1)
        inst, end_inst = (self._spm_model.spm_model.piece_to_id(piece) for piece in ("[INST]", "[/INST]"))
        tokens, mask = [self.bos_id], [True]
        for i, message in enumerate(turns):
            if message.role == "user":
                text = "\n\n".join([*system, message.text_content]) if i == last_user else message.text_content
                ids = [inst, *self.encode(text, add_bos=False, add_eos=False), end_inst]
            elif message.role == "assistant":
                ids = self.encode(message.text_content.strip(), add_bos=False, add_eos=False)
                ids += [self.eos_id] if i < len(turns) - 1 else []
            else:
                raise ValueError(f"Mistral v0.3's chat format has no {message.role!r} turn here (only a first system)")
            tokens += ids
            mask += [message.masked] * len(ids)
        return _with_end(tokens, mask, self.eos_id, add_eos)


def mistral_v0_3_tokenizer(path: str, max_seq_len: int | None = None) -> MistralV3Tokenizer:
    """Mistral 7B v0.3's tokenizer (``tokenizer.model``) with the v0.3 Instruct chat format."""
    tokenizer = MistralV3Tokenizer(path=path, max_seq_len=max_seq_len, prompt_template=None)
    pieces = tokenizer._spm_model.spm_model
    if any(pieces.id_to_piece(pieces.piece_to_id(piece)) != piece for piece in ("[INST]", "[/INST]")):
        raise ValueError(f"{path} has no [INST]/[/INST] pieces: not a Mistral v0.3 tokenizer.model (v0.1/v0.2 "
                         "write them as text: use torchtune.models.mistral.mistral_tokenizer)")  # fmt: skip
    return tokenizer


@dataclass
class ChatMLTurn:
    """One ChatML turn, ``<|im_start|>{role}\n{prefill}{text}<|im_end|>\n``. ``prefill`` is what a generation
    prompt writes before the model's own text (Qwen3's empty think block in non-thinking mode): a header, never
    trained."""

    role: str
    text: str
    masked: bool
    prefill: str = ""


def chatml_turns(messages: list[Message], tools: list[dict[str, Any]] | None = None,
                 default_system: str | None = None) -> list[ChatMLTurn]:  # fmt: skip
    """Messages as the Qwen2.5 / Qwen3 templates write them: the tools block in the system turn (after the row's
    system text, else ``default_system``), calls as ``<tool_call>`` blocks, consecutive results merged into one
    ``user`` turn (:mod:`dpo_components.data.tools`). A message may carry Qwen3's ``prefill`` (the generation
    prompt's empty think block) and ``think`` (its own think block, written before its text and calls), as
    :func:`dpo_components.models.qwen3.qwen3_turns` sets them."""
    system = messages[0] if messages and messages[0].role == "system" else None
    system_text = system.text_content if system is not None else default_system
    if tools:  # after the system text and a blank line, even an empty system message's
        system_text = (system_text + "\n\n" if system_text is not None else "") + qwen_tools_text(tools)
    turns = [ChatMLTurn("system", system_text, True)] if system_text is not None else []
    for message in qwen_merge_results(messages[system is not None :]):
        text = message.text_content
        if message.role == "assistant":
            text = getattr(message, "think", "") + qwen_calls_text(text, message)
        turns.append(ChatMLTurn(message.role, text, message.masked, getattr(message, "prefill", "")))
    return turns


def _byte_lengths(tokenizer: Qwen2_5Tokenizer, ids: list[int]) -> list[int]:
    special = tokenizer._special_tokens_reversed
    return [len(special[i].encode()) if i in special else len(tokenizer.decoder[i]) for i in ids]


def encode_with_header(tokenizer: Qwen2_5Tokenizer, header: str, text: str) -> tuple[list[int], int]:
    """``header + text`` encoded in one piece, as the template's text is, and how many of its tokens lie wholly
    within the header (a token that also holds text, e.g. ``\n\n\n`` of ``assistant\n`` + ``\n\nSoft``, is
    the text's: it is what the model writes)."""
    ids = tokenizer.encode(header + text, add_bos=False, add_eos=False)
    budget, count = len(header.encode()), 0
    for length in _byte_lengths(tokenizer, ids):
        if length > budget:
            break
        budget, count = budget - length, count + 1
    return ids, count


def chatml_tokenize(tokenizer: Qwen2_5Tokenizer, turns: list[ChatMLTurn], add_eos: bool = True,
                    response_last: bool = True) -> tuple[list[int], list[bool]]:  # fmt: skip
    """ChatML turns (:func:`chatml_turns`) as token ids with each turn's ``role\n`` + text encoded in one piece, as
    the template's text is (torchtune encodes the role header apart, which splits e.g. ``\n\n\n`` into
    ``\n`` + ``\n\n`` on the released 151k-token BPE).

    Masks: an unmasked assistant turn trains its text and ``<|im_end|>``, never its header (``<|im_start|>``,
    ``assistant\n`` and the prefill) nor the newline after ``<|im_end|>``; other turns are all ``masked``. A final
    assistant turn (``response_last``) ends with its text: the caller's EOS, ``<|im_end|>`` for the Instruct
    models, follows with ``add_eos``; with ``response_last=False`` the turns are a prompt, all closed."""
    tokens: list[int] = []
    mask: list[bool] = []
    for index, turn in enumerate(turns):
        ids, header = encode_with_header(tokenizer, f"{turn.role}\n{turn.prefill}", turn.text)
        ids, header = [tokenizer.im_start_id, *ids], header + 1
        trained = turn.role == "assistant" and not turn.masked  # else every token is turn.masked
        turn_mask = [True] * header + [False] * (len(ids) - header) if trained else [turn.masked] * len(ids)
        if not (response_last and turn.role == "assistant" and index == len(turns) - 1):
            newline = tokenizer.encode("\n", add_bos=False, add_eos=False)
            ids = [*ids, tokenizer.im_end_id, *newline]
            turn_mask += [turn.masked] + [turn.masked or trained] * len(newline)
        tokens += ids
        mask += turn_mask
    if add_eos:
        tokens, mask = [*tokens, tokenizer.eos_id], [*mask, mask[-1] if mask else True]
    if tokenizer.max_seq_len:
        tokens = truncate(tokens, tokenizer.max_seq_len, tokenizer.eos_id if add_eos else None)
        mask = truncate(mask, tokenizer.max_seq_len, True if add_eos else None)
    return tokens, mask


class Qwen2_5InstructTokenizer(Qwen2_5Tokenizer):  # noqa: N801 (torchtune's naming)
    """torchtune's Qwen2.5 tokenizer with the Instruct template's default system turn, one-piece turns
    (:func:`chatml_tokenize`) and its tool format (:mod:`dpo_components.data.tools`)."""

    def tokenize_messages(self, messages: list[Message], *, add_eos: bool = True,
                          tools: list[dict[str, Any]] | None = None) -> tuple[list[int], list[bool]]:  # fmt: skip
        return chatml_tokenize(self, chatml_turns(messages, tools, QWEN2_5_DEFAULT_SYSTEM), add_eos=add_eos)


def qwen2_5_instruct_tokenizer(
    path: str, merges_file: str, special_tokens_path: str | None = None, max_seq_len: int | None = None
) -> Qwen2_5InstructTokenizer:
    """Qwen2.5 Instruct's tokenizer (``vocab.json``, ``merges.txt``; ``tokenizer.json`` for special tokens)."""
    special_tokens = QWEN2_5_SPECIAL_TOKENS
    if special_tokens_path is not None:
        special_tokens = parse_hf_tokenizer_json(special_tokens_path)
    return Qwen2_5InstructTokenizer(path=path, merges_file=merges_file, special_tokens=special_tokens,
                                    max_seq_len=max_seq_len)  # fmt: skip


class _Cl100kSplitBPE(GPT2BaseTokenizer):
    """torchtune's byte-level BPE, splitting text with cl100k's pattern (Phi-4's) before the merges."""

    def _tokenize(self, text: str) -> list[str]:
        pieces = []
        for chunk in regex.findall(CL100K_PATTERN, text):
            pieces += self.bpe("".join(self.byte_encoder[b] for b in chunk.encode("utf-8"))).split(" ")
        return pieces


def phi4_tokenizer(
    vocab_path: str, merges_path: str, special_tokens_path: str | None = None, max_seq_len: int | None = None
) -> Phi4Tokenizer:
    """torchtune's Phi-4 tokenizer splitting text with Phi-4's own (cl100k) pattern."""
    tokenizer = tt_phi4_tokenizer(vocab_path, merges_path, special_tokens_path=special_tokens_path,
                                  max_seq_len=max_seq_len)  # fmt: skip
    tokenizer.tokenizer_model = _Cl100kSplitBPE(
        vocab_path, merges_path, tokenizer.eos_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    )  # as torchtune builds it
    return tokenizer


LLAMA3_1_DEFAULT_DATE = "26 Jul 2024"  # Llama 3.1's and 3.3's template default (3.2's fallback)
LLAMA3_1_SYSTEM_BLOCK = "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"


class Llama3_1InstructTokenizer(Llama3Tokenizer):  # noqa: N801 (torchtune's naming)
    """torchtune's Llama 3 tokenizer with Llama 3.1+ Instruct's dated system block (see the module docstring)."""

    def __init__(self, *args, date_string: str = LLAMA3_1_DEFAULT_DATE, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.date_string = date_string

    def tokenize_messages(self, messages: list[Message], *, add_end_tokens: bool = True,
                          tools: list[dict[str, Any]] | None = None) -> tuple[list[int], list[bool]]:  # fmt: skip
        """The template's turns: the dated system block (``Environment: ipython`` first when the row has tools),
        the tools in the first user turn, calls and results as :mod:`dpo_components.data.tools` says. Masks: an
        unmasked assistant turn trains its text and ``<|eot_id|>``, never its header."""
        has_system = bool(messages) and messages[0].role == "system"
        text = ("Environment: ipython\n" if tools else "") + LLAMA3_1_SYSTEM_BLOCK.format(date=self.date_string)
        text += messages[0].text_content.strip() if has_system else ""
        # the header, then the block as the template writes it (torchtune would strip its trailing "\n\n")
        tokens = [self.bos_id, *self._tokenize_header(Message("system", "")),
                  *self.encode(text, add_bos=False, add_eos=False), self.eot_id]  # fmt: skip
        mask = [True] * len(tokens)
        turns = messages[has_system:]
        if tools and (not turns or turns[0].role != "user"):
            raise ValueError("a row with tools needs a first user turn: Llama 3.1+'s template writes the tools there")
        for i, message in enumerate(turns):
            if tool_calls(message):
                body = llama3_call_text(message)
            elif message.role == "ipython":  # the template's tojson: a structured result as JSON, a string quoted
                body = message.text_content if message.content[0].get("json") else to_json(message.text_content)
            else:
                body = (llama3_tools_text(tools) if tools and i == 0 else "") + message.text_content.strip()
            header = self._tokenize_header(Message(message.role, ""))
            ids = self.encode(body, add_bos=False, add_eos=False)
            ids += [self.eot_id] if add_end_tokens or i < len(turns) - 1 else []
            tokens += header + ids
            mask += [message.masked or message.role == "assistant"] * len(header) + [message.masked] * len(ids)
        if add_end_tokens:
            tokens, mask = [*tokens, self.eos_id], [*mask, True]
        if self.max_seq_len:
            tokens = truncate(tokens, self.max_seq_len, self.eos_id if add_end_tokens else None)
            mask = truncate(mask, self.max_seq_len, True if add_end_tokens else None)
        return tokens, mask


def llama3_1_instruct_tokenizer(
    path: str,
    special_tokens_path: str | None = None,
    max_seq_len: int | None = None,
    date_string: str = LLAMA3_1_DEFAULT_DATE,
) -> Llama3_1InstructTokenizer:
    """Llama 3.1 / 3.2 / 3.3 Instruct's tokenizer (``original/tokenizer.model``) with their chat format: the
    system block with "Cutting Knowledge Date: December 2023" and "Today Date: ``date_string``"."""
    special_tokens = parse_hf_tokenizer_json(special_tokens_path) if special_tokens_path is not None else None
    return Llama3_1InstructTokenizer(path=path, special_tokens=special_tokens, max_seq_len=max_seq_len,
                                     date_string=date_string)  # fmt: skip
