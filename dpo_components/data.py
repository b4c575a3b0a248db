"""Preference data: one builder over ``datasets.load_dataset`` for the formats people have, and the collator.

Row formats (``format=``, or ``"auto"`` to detect from the first row; ``column_map`` renames columns first,
e.g. ``{"prompt": "question", "chosen": "response_j", "rejected": "response_k"}``):

- ``explicit``: ``prompt``, ``chosen``, ``rejected`` are strings (stack-exchange-paired, the synthetic task);
- ``conversational``: all three are lists of ``{"role", "content"}`` messages (TRL's conversational format);
  ``chosen`` / ``rejected`` hold the assistant turn(s) only;
- ``implicit``: ``chosen`` and ``rejected`` are whole conversations that share their first turns, which are
  the prompt (UltraFeedback-binarized, torchtune's ``preference_dataset``); a ``prompt`` column is ignored;
- ``hh``: Anthropic HH-RLHF raw strings, ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``, split into turns and then
  treated as ``implicit``.

Each row is tokenized with the model tokenizer's chat format (``tokenize_messages``); the prompt (with the
assistant header that opens the response, i.e. the generation prompt) is masked out of the labels (-100).
Truncation, when prompt + longer response exceeds ``max_length``:

1. the prompt is cut to ``max_prompt_length`` tokens (keeping its end, i.e. the latest turn, and its first
   token, BOS), as in the original DPO code's ``keep_end`` mode;
2. both responses are cut to the tokens left, ``max_length - len(prompt)`` (keeping their start).

``max_prompt_length < max_length`` is enforced, so every sample keeps at least one response token: there is
no silent constant ln 2 loss from an empty response (torchtune 0.6.1 trains such rows). Bad rows (missing
column, wrong type, empty response, chosen identical to rejected, a prompt that cannot fit) raise
:class:`PreferenceDataError` naming the file and row, or with ``on_bad_row="skip"`` are skipped and counted
in a summary line. ``holdout_fraction`` with ``part="heldout"`` gives a seeded held-out split of the same rows.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from datasets import load_dataset
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset
from torchtune.data import Message
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from dpo_components.logprobs import IGNORE_INDEX

log = logging.getLogger(__name__)

FORMATS = ("explicit", "conversational", "implicit", "hh")
_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "ipython": "ipython", "tool": "ipython"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


class PreferenceDataError(ValueError):
    """A malformed preference row; the message names the source and the row."""


class _BadRow(Exception):
    """Internal: why one row is unusable (turned into PreferenceDataError or a skip count)."""


# ----------------------------------------------------------------------------------------------- row parsing


def detect_format(row: dict[str, Any]) -> str:
    """Guess the row format from one (already column-mapped) row."""
    chosen = row.get("chosen")
    if isinstance(chosen, list):
        return "conversational" if isinstance(row.get("prompt"), list) else "implicit"
    if isinstance(chosen, str):
        if "prompt" in row:
            return "explicit"
        if chosen.lstrip("\n").startswith("Human:"):
            return "hh"
    raise PreferenceDataError(
        f"cannot detect the preference format from columns {sorted(row)}; set format to one of {FORMATS} "
        "and column_map if the columns are named differently"
    )


def _field(row: dict[str, Any], key: str, kind: type) -> Any:
    if row.get(key) is None:  # datasets fills a key missing from some rows with None
        raise _BadRow(f"missing '{key}' (no such column, or a null value)")
    value = row[key]
    if not isinstance(value, kind):
        raise _BadRow(f"'{key}' must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _messages(value: list[Any], key: str) -> list[Message]:
    messages = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise _BadRow(f"'{key}'[{i}] must be a {{'role': str, 'content': str}} message, got {m!r:.80}")
        if m["role"] not in _ROLES:
            raise _BadRow(f"'{key}'[{i}] has unknown role '{m['role']}' (expected one of {sorted(_ROLES)})")
        messages.append(Message(role=_ROLES[m["role"]], content=m["content"]))
    return messages


def _split_hh(text: str, key: str) -> list[Message]:
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if parts[0].strip() or len(parts) < 3:
        raise _BadRow(f"'{key}' is not in HH-RLHF form ('\\n\\nHuman: ...\\n\\nAssistant: ...')")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [Message(role=roles[who], content=said) for who, said in zip(parts[1::2], parts[2::2])]


def _split_shared_prefix(chosen: list[Message], rejected: list[Message]) -> tuple[list, list, list]:
    shared = 0
    for a, b in zip(chosen, rejected):
        if (a.role, a.text_content) != (b.role, b.text_content):
            break
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise _BadRow("chosen and rejected are identical")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def parse_row(row: dict[str, Any], fmt: str) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt messages, chosen response messages, rejected response messages) of one row; raises _BadRow."""
    if fmt == "explicit":
        prompt = [Message(role="user", content=_field(row, "prompt", str))]
        chosen = [Message(role="assistant", content=_field(row, "chosen", str))]
        rejected = [Message(role="assistant", content=_field(row, "rejected", str))]
    elif fmt == "conversational":
        prompt = _messages(_field(row, "prompt", list), "prompt")
        chosen = _messages(_field(row, "chosen", list), "chosen")
        rejected = _messages(_field(row, "rejected", list), "rejected")
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
        raise PreferenceDataError(f"unknown format '{fmt}'; expected one of {FORMATS} or 'auto'")

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


# ------------------------------------------------------------------------------------- tokenize and truncate


def _generation_prompt(tokenizer: ModelTokenizer, prompt: list[Message]) -> list[int]:
    """The prompt in chat format followed by the assistant header: what a model is given at generation time."""
    messages = [Message(m.role, m.content, masked=True) for m in prompt] + [Message("assistant", "")]
    return tokenizer.tokenize_messages(messages, add_end_tokens=False)[0]


def _tokenize(
    tokenizer: ModelTokenizer, prompt: list[Message], response: list[Message], generation_prompt: list[int]
) -> tuple[list[int], list[int], list[bool]]:
    """(prompt ids, response ids, response masked flags) for prompt + response in the tokenizer's chat format.

    The response starts after the assistant header (as in TRL, and as generation sees it), so the header is
    not trained and not counted in length-averaged losses. Should the header not be a prefix (a response that
    starts with a tool turn, an unusual template), it starts at the first unmasked token (torchtune's rule).
    """
    messages = [Message(m.role, m.content, masked=True) for m in prompt]
    messages += [Message(m.role, m.content, masked=False) for m in response]
    tokens, mask = tokenizer.tokenize_messages(messages)
    start = mask.index(False)
    if tokens[: len(generation_prompt)] == generation_prompt and not all(mask[len(generation_prompt) :]):
        start = max(start, len(generation_prompt))
    return tokens[:start], tokens[start:], mask[start:]


def _truncate(
    prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, max_prompt_length: int | None
) -> tuple[list[int], list[int], list[int]]:
    if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return prompt, chosen, rejected
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[:1] + prompt[len(prompt) - max_prompt_length + 1 :]  # keep BOS and the latest turn
    budget = max_length - len(prompt)
    if budget < 1:
        raise _BadRow(
            f"prompt of {len(prompt)} tokens leaves no room for a response within max_length={max_length}; "
            "set max_prompt_length to truncate long prompts"
        )
    return prompt, chosen[:budget], rejected[:budget]


class PreferenceDataset(Dataset):
    """Tokenized preference pairs. Item i is a dict of token lists:

    ``prompt_ids``, ``chosen_labels``, ``rejected_labels`` (response token ids, -100 where the tokenizer masks a
    token, e.g. a trailing end-of-text), and ``index`` (i). ``input_ids`` of a side are ``prompt_ids`` followed
    by that side's response ids; :func:`collate_preference_batch` assembles them.
    ``skipped`` counts skipped rows by reason; ``source`` names where the rows came from.
    """

    def __init__(self, samples: list[dict[str, Any]], source: str, skipped: Counter | None = None) -> None:
        self._samples = samples
        self.source = source
        self.skipped = skipped or Counter()

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self._samples[index], "index": index}

    def sample_lengths(self) -> list[int]:
        """Prompt + longer response, per sample: the padded length the sample needs."""
        return [
            len(s["prompt_ids"]) + max(len(s["chosen_response_ids"]), len(s["rejected_response_ids"]))
            for s in self._samples
        ]


def tokenize_rows(
    rows: Sequence[dict[str, Any]],
    tokenizer: ModelTokenizer,
    *,
    source: str,
    row_numbers: Sequence[int] | None = None,
    format: str = "auto",
    column_map: dict[str, str] | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
) -> PreferenceDataset:
    """Parse, tokenize and truncate ``rows`` (dicts) into a :class:`PreferenceDataset`.

    ``row_numbers`` are the rows' positions in ``source`` for error messages (default 0..n-1). ``column_map``
    maps our names (prompt / chosen / rejected) to the rows' column names.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got '{on_bad_row}'")
    max_length = max_length or getattr(tokenizer, "max_seq_len", None)
    if not max_length:
        raise ValueError("set max_length (or the tokenizer's max_seq_len): the longest prompt + response in tokens")
    if max_prompt_length is not None and not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"max_prompt_length={max_prompt_length} must be in [1, max_length={max_length}) so that every "
            "sample keeps at least one response token"
        )
    rename = {v: k for k, v in (column_map or {}).items()}
    row_numbers = list(row_numbers) if row_numbers is not None else list(range(len(rows)))

    samples, skipped = [], Counter()
    # The tokenizer's own max_seq_len would cut chosen and rejected independently (and could cut a whole
    # response away); truncation is ours, so switch it off while tokenizing.
    tokenizer_max_seq_len = getattr(tokenizer, "max_seq_len", None)
    tokenizer.max_seq_len = None
    try:
        for number, raw in zip(row_numbers, rows):
            row = {rename.get(k, k): v for k, v in raw.items()}
            try:
                if format == "auto":
                    format = detect_format(row)
                prompt, chosen, rejected = parse_row(row, format)
                generation_prompt = _generation_prompt(tokenizer, prompt)
                prompt_ids, chosen_ids, chosen_masked = _tokenize(tokenizer, prompt, chosen, generation_prompt)
                prompt_ids_r, rejected_ids, rejected_masked = _tokenize(tokenizer, prompt, rejected, generation_prompt)
                if prompt_ids != prompt_ids_r:
                    raise _BadRow("chosen and rejected tokenize to different prompts")
                prompt_ids, chosen_ids, rejected_ids = _truncate(
                    prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length
                )
                if chosen_ids == rejected_ids:
                    raise _BadRow(f"chosen and rejected are identical after truncation to {max_length} tokens")
                samples.append(
                    {
                        "prompt_ids": prompt_ids,
                        "chosen_response_ids": chosen_ids,
                        "chosen_labels": _labels(chosen_ids, chosen_masked),
                        "rejected_response_ids": rejected_ids,
                        "rejected_labels": _labels(rejected_ids, rejected_masked),
                    }
                )
            except _BadRow as bad:
                if on_bad_row == "error":
                    raise PreferenceDataError(
                        f"{source} row {number}: {bad} (set on_bad_row: skip to skip such rows)"
                    ) from None
                skipped[str(bad)] += 1
    finally:
        tokenizer.max_seq_len = tokenizer_max_seq_len
    if skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in skipped.most_common())
        log.warning("%s: skipped %d of %d rows: %s", source, sum(skipped.values()), len(rows), reasons)
    return PreferenceDataset(samples, source, skipped)


def _labels(ids: list[int], masked: list[bool]) -> list[int]:
    """Response token ids with the tokenizer's masked positions (e.g. a trailing end-of-text) set to -100."""
    return [IGNORE_INDEX if m else tok for tok, m in zip(ids, masked)]


# ------------------------------------------------------------------------------------------------ builder


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
        split: the named split to read, e.g. ``"train"`` or ``"test_prefs"``; slicing (``"train[:90%]"``) works.
        format: one of ``explicit``, ``conversational``, ``implicit``, ``hh`` or ``auto`` (detect).
        column_map: our column name -> the data's, e.g. ``{"chosen": "response_j"}``.
        max_length: longest prompt + response in tokens (default: the tokenizer's ``max_seq_len``).
        max_prompt_length: prompts longer than this are cut (keeping the end) when a sample is too long.
            ``None`` never cuts prompts: a prompt that leaves no room for a response is then a bad row.
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
    rows = load_dataset(source, data_files=data_files, split=split, **load_dataset_kwargs)
    where = f"{data_files if data_files is not None else source} (split '{split}')"

    numbers = np.arange(len(rows))
    if holdout_fraction:
        permuted = np.random.default_rng(holdout_seed).permutation(len(rows))
        n_heldout = max(1, round(holdout_fraction * len(rows)))
        numbers = np.sort(permuted[:n_heldout] if part == "heldout" else permuted[n_heldout:])
        where += f" {part} part"
    selected = rows.select(numbers.tolist()) if holdout_fraction else rows
    return tokenize_rows(
        selected,
        tokenizer,
        source=where,
        row_numbers=numbers.tolist(),
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
