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
  gives ``['\n', '\n']`` where the template gives ``['\n\n']``. Here every prompt turn is encoded in one piece; the
  response after the generation prompt is encoded on its own, as a model generates it after ``assistant\n``.
- **Llama 3.1 / 3.2 / 3.3 Instruct** (``llama3_1_instruct_tokenizer``): their templates always open with a system
  block ``Cutting Knowledge Date: December 2023\nToday Date: <date>\n\n`` (then the system message, if any); the
  date is settable (``date_string``), "26 Jul 2024" by default (Llama 3.1's and 3.3's default; 3.2's template
  writes the day it is run, which would make a dataset's tokens depend on the day). Tools are left out (the
  templates' ``Environment: ipython`` and tool-call turns). Llama 3.0 keeps torchtune's format.

The end of a trained response is the family's: the end-of-turn marker, then EOS where torchtune appends one
(``add_eos``). The template's newline after the last end-of-turn marker is not part of the response.
"""

from __future__ import annotations

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


def chatml_tokenize(tokenizer: Qwen2_5Tokenizer, messages: list[Message], add_eos: bool = True,
                    response_last: bool = True) -> tuple[list[int], list[bool]]:  # fmt: skip
    """torchtune's ChatML ``tokenize_messages`` (Qwen2/2.5/3) with each turn's ``role\ncontent`` encoded in one
    piece, as the template's text is; only a final assistant turn (the response) has its header ``assistant\n``
    encoded apart from its content, so the generation prompt is a prefix of prompt + response.

    ``<|im_start|>{role}\n{content}<|im_end|>\n`` per turn; the final assistant turn ends with its content (the
    caller's EOS, ``<|im_end|>`` for the Instruct models, follows with ``add_eos``). ``response_last=False``: the
    messages are a prompt, and a final assistant turn is closed like any other."""
    tokens: list[int] = []
    mask: list[bool] = []
    for index, message in enumerate(messages):
        if message.role == "ipython":
            raise ValueError("tool (ipython) turns are not supported by this ChatML format")
        response = response_last and message.role == "assistant" and index == len(messages) - 1
        if response:
            ids = [tokenizer.im_start_id, *tokenizer.encode("assistant\n", add_bos=False, add_eos=False),
                   *tokenizer.encode(message.text_content, add_bos=False, add_eos=False)]  # fmt: skip
        else:
            text = f"{message.role}\n{message.text_content}"
            ids = [tokenizer.im_start_id, *tokenizer.encode(text, add_bos=False, add_eos=False), tokenizer.im_end_id,
                   *tokenizer.encode("\n", add_bos=False, add_eos=False)]  # fmt: skip
        tokens += ids
        mask += [message.masked] * len(ids)
    if add_eos:
        tokens, mask = [*tokens, tokenizer.eos_id], [*mask, mask[-1] if mask else True]
    if tokenizer.max_seq_len:
        tokens = truncate(tokens, tokenizer.max_seq_len, tokenizer.eos_id if add_eos else None)
        mask = truncate(mask, tokenizer.max_seq_len, True if add_eos else None)
    return tokens, mask


class Qwen2_5InstructTokenizer(Qwen2_5Tokenizer):  # noqa: N801 (torchtune's naming)
    """torchtune's Qwen2.5 tokenizer with the Instruct template's default system turn and one-piece turns
    (:func:`chatml_tokenize`)."""

    def tokenize_messages(self, messages: list[Message], *, add_eos: bool = True) -> tuple[list[int], list[bool]]:
        if not messages or messages[0].role != "system":
            messages = [Message("system", QWEN2_5_DEFAULT_SYSTEM, masked=True), *messages]
        return chatml_tokenize(self, messages, add_eos=add_eos)


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

    def tokenize_messages(self, messages: list[Message], *, add_end_tokens: bool = True
                          ) -> tuple[list[int], list[bool]]:  # fmt: skip
        has_system = bool(messages) and messages[0].role == "system"
        text = LLAMA3_1_SYSTEM_BLOCK.format(date=self.date_string)
        text += messages[0].text_content.strip() if has_system else ""
        # the header, then the block as the template writes it (torchtune would strip its trailing "\n\n")
        block = [*self._tokenize_header(Message("system", "")), *self.encode(text, add_bos=False, add_eos=False),
                 self.eot_id]  # fmt: skip
        max_seq_len, self.max_seq_len = self.max_seq_len, None  # truncate once, below, with the block in
        try:
            tokens, mask = super().tokenize_messages(messages[has_system:], add_end_tokens=add_end_tokens)
        finally:
            self.max_seq_len = max_seq_len
        tokens, mask = [tokens[0], *block, *tokens[1:]], [mask[0], *[True] * len(block), *mask[1:]]
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
