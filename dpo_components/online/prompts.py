"""Prompts to sample responses for (online DPO): ``prompt_dataset``, the YAML ``prompt_dataset._component_``.

A row gives its prompt in any form the preference formats know (``dpo_components.data.formats``): a ``prompt``
column alone (a string, an HH-RLHF ``"\\n\\nHuman: ...\\n\\nAssistant:"`` string, or a list of messages, with an
optional ``system`` column), or a whole preference row of any format, whose prompt is taken and responses
ignored (so the preference data of an offline run is a prompt source as it is).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any, Literal

from torch.utils.data import Dataset
from torchtune.data import Message
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from dpo_components.data.chat import check_tokenizer, generation_prompt
from dpo_components.data.dataset import (
    Cuts,
    _line_describer,
    _shorten_prompt,
    each_row,
    load_rows,
    own_truncation,
    report_skipped,
)
from dpo_components.data.formats import (
    BadRow,
    _hh_prompt,
    _messages,
    _with_system,
    detect_format,
    map_columns,
    parse_row,
)
from dpo_components.data.report import DataReport
from dpo_components.data.tools import check_tool_use, message_dicts, parse_tools


class PromptDataset(Dataset):
    """Tokenized prompts. Item i: ``prompt_ids`` (chat format with the generation prompt, what a model is given),
    ``messages`` (the prompt's turns as ``{"role", "content"}``, what a reward model is given) and ``index``."""

    data_kind = "prompts"

    def __init__(self, samples: list[dict[str, Any]], source: str, row_numbers: list[int],
                 skipped: Counter | None = None) -> None:  # fmt: skip
        self._samples = samples
        self.source = source
        self.row_numbers = row_numbers
        self.skipped = skipped or Counter()
        self.report: DataReport | None = None  # rows read, skipped, prompts cut (dpo_components.data.report)

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self._samples[index], "index": index}

    def content_hash(self) -> str:
        """SHA-256 of every prompt's token ids, in order (the run's fingerprint holds it)."""
        digest = hashlib.sha256()
        for sample in self._samples:
            digest.update(json.dumps(sample["prompt_ids"], separators=(",", ":")).encode())
        return digest.hexdigest()


def prompt_messages(row: dict[str, Any]) -> list[Message]:
    """The prompt turns of one (column-mapped) row: a ``prompt`` column alone, or a preference row's prompt."""
    if row.get("chosen") is not None or row.get("rejected") is not None:
        fmt = detect_format(row)
        if fmt is None:
            raise BadRow(f"cannot detect the preference format from columns {sorted(row)}",
                         "the preference format cannot be detected")  # fmt: skip
        return parse_row(row, fmt)[0]
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRow("'prompt' is empty")
        turns = _hh_prompt(prompt) or [Message(role="user", content=prompt)]
    elif isinstance(prompt, (list, dict)):
        turns = _messages(prompt, "prompt")
        if not turns or turns[-1].role not in ("user", "ipython"):
            raise BadRow("a prompt's messages must end with a user turn (or a tool result)",
                         "the prompt does not end with a user turn")  # fmt: skip
    else:
        raise BadRow(f"missing 'prompt' (no such column, or {type(prompt).__name__}); a prompt row needs a 'prompt' "
                     "string or list of messages", "missing 'prompt'")  # fmt: skip
    return _with_system(turns, row)


def prompt_dataset(
    tokenizer: ModelTokenizer,
    *,
    source: str,
    data_files: str | list[str] | None = None,
    split: str = "train",
    column_map: dict[str, str] | None = None,
    max_prompt_length: int | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
    **load_dataset_kwargs: Any,
) -> PromptDataset:
    """Load prompts with ``datasets.load_dataset`` and tokenize them in the tokenizer's chat format.

    Args:
        tokenizer: a torchtune ``ModelTokenizer``.
        source, data_files, split, column_map, **load_dataset_kwargs: as
            :func:`~dpo_components.data.preference_dataset`.
        max_prompt_length: longer prompts are cut (oldest turns first, then the start of the latest turn at a
            word boundary, as the preference data cuts them); None keeps them whole.
        on_bad_row: ``"error"`` (default) raises naming the file and row; ``"skip"`` skips and logs a summary.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got '{on_bad_row}'")
    check_tokenizer(tokenizer)
    rows, numbers, where = load_rows(source, data_files, split, column_map, 0.0, "train", 0, **load_dataset_kwargs)
    column_map = dict(column_map or {})

    def tokenize(raw: dict[str, Any]) -> tuple[dict[str, Any], Cuts]:
        row = map_columns(raw, column_map)
        prompt, tools = prompt_messages(row), parse_tools(row)
        check_tool_use(prompt, tools)
        cuts = Cuts()
        if max_prompt_length is not None and len(generation_prompt(tokenizer, prompt, tools)) > max_prompt_length:
            prompt, cuts.prompt = _shorten_prompt(tokenizer, prompt, max_prompt_length, tools), True
        sample = {"prompt_ids": generation_prompt(tokenizer, prompt, tools), "messages": message_dicts(prompt)}
        return ({**sample, "tools": tools} if tools else sample), cuts

    skipped: Counter = Counter()
    with own_truncation(tokenizer):
        results, kept = each_row(rows, numbers, tokenize, source=where, describe_row=_line_describer(data_files),
                                 on_bad_row=on_bad_row, skipped=skipped)  # fmt: skip
    report_skipped(skipped, len(results), rows, where, lambda: "")
    dataset = PromptDataset([sample for sample, _ in results], where, kept, skipped)
    dataset.report = DataReport.of(dataset, len(rows), [cuts for _, cuts in results], max_prompt_length or 0)
    return dataset
