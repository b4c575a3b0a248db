"""Preference data: one builder over ``datasets.load_dataset`` for the formats people have.

Rows come in the formats of :mod:`dpo_components.data.formats` (``format=`` explicit, conversational, implicit,
hh, or ``"auto"`` to detect per row; ``column_map`` renames the data's columns).

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

import contextlib
import csv
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from datasets import Dataset as HFDataset
from datasets import ReadInstruction, concatenate_datasets, load_dataset
from torch.utils.data import Dataset
from torchtune.data import Message
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from dpo_components.data.chat import check_tokenizer, generation_prompt, tokenize_chat
from dpo_components.data.formats import (
    COLUMNS,
    FORMATS,
    BadRow,
    PreferenceDataError,
    detect_format,
    map_columns,
    parse_row,
)
from dpo_components.data.report import DataReport
from dpo_components.data.tools import check_tool_use, parse_tools, with_text

log = logging.getLogger(__name__)
IGNORE_INDEX = -100  # the label of a position that is not scored (prompt, padding), as torch's cross-entropy


# ------------------------------------------------------------------------------------- tokenize and truncate


def _tokenize(
    tokenizer: ModelTokenizer,
    prompt: list[Message],
    response: list[Message],
    header: list[int],
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[int], list[int], list[bool]]:
    """(prompt ids, response ids, response masked flags) for prompt + response in the tokenizer's chat format.

    The response starts after ``header`` (:func:`generation_prompt`: as in TRL, and as generation sees it), so
    the assistant header is not trained and not counted in length-averaged losses; where the sequence leaves the
    header earlier, at that token: the template's text merges the header's end with the response's start into one
    token (Qwen's ``\n\n\n``), or the response opens with another turn (a tool result, a user turn) or an
    assistant turn written otherwise (Qwen3's masked turns have no think block). Of the response's turns only
    assistant turns train (a response's ``masked`` turns, tool results and user turns are context).
    """
    messages = [Message(m.role, m.content, masked=True) for m in prompt]
    messages += [Message(m.role, m.content, masked=m.masked or m.role != "assistant") for m in response]
    tokens, mask = tokenize_chat(tokenizer, messages, tools)
    start = 0
    while start < min(len(header), len(tokens) - 1) and tokens[start] == header[start]:
        start += 1
    if all(mask[start:]):
        raise BadRow("the response trains no token (its assistant turns are all masked)")
    return tokens[:start], tokens[start:], mask[start:]


def _word_starts(text: str) -> list[int]:
    """Offsets where a word starts (after whitespace); every character offset for text without spaces."""
    starts = [i for i in range(1, len(text)) if text[i - 1].isspace() and not text[i].isspace()]
    return starts or list(range(1, len(text)))


def _shorten_prompt(
    tokenizer: ModelTokenizer,
    prompt: list[Message],
    max_prompt_length: int,
    tools: list[dict[str, Any]] | None = None,
) -> list[Message]:
    """The prompt cut to at most ``max_prompt_length`` tokens (generation prompt included), keeping its end.

    Whole turns go first, the oldest exchange first (so the prompt still starts with a user turn, as strict
    templates require); the system turn is kept. If the latest turn alone is too long, the start of its text is
    cut at a word boundary, so no chat header and no character is ever cut in half.
    """
    system = [m for m in prompt[:1] if m.role == "system"]
    body = prompt[len(system) :]
    length = lambda turns: len(generation_prompt(tokenizer, system + turns, tools))
    while length(body) > max_prompt_length and any(m.role == "user" for m in body[1:]):
        body = body[1:]  # whole exchanges go while a later user turn is left to start with
        while body[0].role != "user":
            body = body[1:]
    if length(body) <= max_prompt_length:
        return system + body

    turn, rest = body[0], body[1:]
    text = turn.text_content
    cut = lambda offset: [with_text(turn, text[offset:])] + rest
    if length(cut(len(text))) > max_prompt_length:
        what = "chat format and system turn" if system else "chat format"
        raise BadRow(
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
    """Tokenized preference pairs (``data_kind = "pairs"``). Item i is a dict of token lists:

    ``prompt_ids``, ``chosen_labels``, ``rejected_labels`` (response token ids, -100 where the tokenizer masks a
    token, e.g. a trailing end-of-text), and ``index`` (i). ``input_ids`` of a side are ``prompt_ids`` followed
    by that side's response ids; :func:`collate_preference_batch` assembles them.
    ``skipped`` counts skipped rows by reason; ``source`` names where the rows came from, and ``row_numbers[i]``
    is sample i's row there (for messages).
    """

    data_kind = "pairs"  # what the rows are: "pairs", or "unpaired" (UnpairedDataset); a loss trains one kind

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
        self.report: DataReport | None = None  # what the builder read, skipped and cut (dpo_components.data.report)

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
                if "desirable" in sample:  # unpaired rows: the label is data too (paired hashes unchanged)
                    fields.append(sample["desirable"])
                digest.update(json.dumps(fields, separators=(",", ":")).encode())
            self._content_hash = digest.hexdigest()
        return self._content_hash

    def sample_lengths(self) -> list[int]:
        """Prompt + longer response, per sample: the padded length the sample needs."""
        return [
            len(s["prompt_ids"]) + max(len(s["chosen_response_ids"]), len(s["rejected_response_ids"]))
            for s in self._samples
        ]


@dataclass
class Cuts:
    """What truncation cut from one prompt and its responses (read by the data report); true if anything was."""

    prompt: bool = False
    responses: list[bool] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.prompt or any(self.responses)


def tokenize_responses(
    tokenizer: ModelTokenizer,
    prompt: list[Message],
    responses: list[list[Message]],
    max_length: int,
    max_prompt_length: int | None,
    fit: int | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[int], list[tuple[list[int], list[bool]]], Cuts]:
    """(prompt ids, [(response ids, masked flags)], what was cut) for responses to one prompt (with the row's
    ``tools``), truncated by the rules of the module docstring. Whether to truncate is decided by the first ``fit``
    responses (all by default: both sides of a pair); every response is then cut to the tokens the prompt leaves,
    ``max_length - len(prompt)``. The prompt ids are what the responses share: where one response's first token
    holds the header's end, or opens with another turn (:func:`_tokenize`), the other responses keep the header
    tokens they have, untrained."""
    fit = len(responses) if fit is None else fit

    def tokenize(prompt: list[Message]) -> tuple[list[int], list[tuple[list[int], list[bool]]]]:
        header = generation_prompt(tokenizer, prompt, tools)
        sequences = []
        for response in responses:
            ids, response_ids, masked = _tokenize(tokenizer, prompt, response, header, tools)
            sequences.append((ids, response_ids, masked))
        shared = min(len(ids) for ids, _, _ in sequences)
        for ids, _, _ in sequences:
            shared = next((k for k in range(shared) if ids[k] != sequences[0][0][k]), shared)
        tokenized = [(ids[shared:] + response_ids, [True] * (len(ids) - shared) + masked)
                     for ids, response_ids, masked in sequences]  # fmt: skip
        return sequences[0][0][:shared], tokenized

    prompt_ids, tokenized = tokenize(prompt)
    cuts = Cuts()
    too_long = len(prompt_ids) + max(len(ids) for ids, _ in tokenized[:fit]) > max_length
    if too_long and max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids, tokenized = tokenize(_shorten_prompt(tokenizer, prompt, max_prompt_length, tools))
        cuts.prompt = True
    budget = max_length - len(prompt_ids)
    if budget < 1:
        raise BadRow(
            f"prompt of {len(prompt_ids)} tokens leaves no room for a response within max_length={max_length}; "
            "set max_prompt_length to truncate long prompts",
            f"prompt leaves no room for a response within max_length={max_length}",
        )
    cuts.responses = [len(ids) > budget for ids, _ in tokenized]
    if any(all(masked[:budget]) for _, masked in tokenized):
        raise BadRow(f"a response keeps no trained token after truncation to max_length={max_length} (its trained "
                     "turns come after what fits)", f"a response keeps no trained token within max_length="
                     f"{max_length}")  # fmt: skip
    return prompt_ids, [(ids[:budget], masked[:budget]) for ids, masked in tokenized], cuts


def _train_final_turn(response: list[Message]) -> list[Message]:
    """The response with every assistant turn but its last masked (``train_turns="final"``)."""
    last = max(i for i, m in enumerate(response) if m.role == "assistant")
    return [Message(m.role, m.content, masked=m.masked or (m.role == "assistant" and i < last))
            for i, m in enumerate(response)]  # fmt: skip


def _tokenize_pair(
    tokenizer: ModelTokenizer,
    row: dict[str, Any],
    fmt: str,
    max_length: int,
    max_prompt_length: int | None,
    train_turns: str = "final",
    place_images: Callable[[list[Message], list[Message], list[Message]], list[Message]] | None = None,
) -> tuple[dict[str, list[int]], Cuts]:
    """One parsed, tokenized and truncated pair (the sample dict of :class:`PreferenceDataset`), and what was cut.
    ``place_images(prompt, chosen, rejected)`` gives the prompt with its image parts (image-grounded pairs,
    :mod:`dpo_components.vision.data`)."""
    prompt, chosen, rejected = parse_row(row, fmt)
    if place_images is not None:
        prompt = place_images(prompt, chosen, rejected)
    tools = parse_tools(row)
    for response in (chosen, rejected):
        check_tool_use(prompt + response, tools)
    if fmt in ("implicit", "hh") and train_turns == "final":
        chosen, rejected = _train_final_turn(chosen), _train_final_turn(rejected)
    prompt_ids, [(chosen_ids, chosen_masked), (rejected_ids, rejected_masked)], truncated = tokenize_responses(
        tokenizer, prompt, [chosen, rejected], max_length, max_prompt_length, tools=tools
    )
    if chosen_ids == rejected_ids:
        if truncated:
            raise BadRow(f"chosen and rejected are identical after truncation to {max_length} tokens")
        raise BadRow("chosen and rejected tokenize identically (their texts differ only in what the chat format "
                      "drops, e.g. surrounding whitespace)")  # fmt: skip
    return {
        "prompt_ids": prompt_ids,
        "chosen_response_ids": chosen_ids,
        "chosen_labels": labels_of(chosen_ids, chosen_masked),
        "rejected_response_ids": rejected_ids,
        "rejected_labels": labels_of(rejected_ids, rejected_masked),
    }, truncated


def check_tokenize_arguments(
    tokenizer: ModelTokenizer,
    formats: tuple[str, ...],
    format: str,
    column_map: dict[str, str] | None,
    max_length: int | None,
    max_prompt_length: int | None,
    on_bad_row: str,
) -> int:
    """Refuse bad builder arguments (before any row is read); return ``max_length`` (default: the tokenizer's)."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got '{on_bad_row}'")
    check_tokenizer(tokenizer)
    if format not in (*formats, "auto"):
        raise ValueError(f"unknown format '{format}'; expected one of {formats} or 'auto'")
    unknown = sorted(set(column_map or {}) - set(COLUMNS))
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
    return max_length


@contextlib.contextmanager
def own_truncation(tokenizer: ModelTokenizer) -> Iterator[None]:
    """The tokenizer's own max_seq_len off for the block: it would cut each response on its own (and could cut a
    whole response away); truncation is ours."""
    tokenizer_max_seq_len = getattr(tokenizer, "max_seq_len", None)
    tokenizer.max_seq_len = None
    try:
        yield
    finally:
        tokenizer.max_seq_len = tokenizer_max_seq_len


def each_row(
    rows: Sequence[Any],
    row_numbers: Sequence[int],
    work: Callable[[Any], Any],
    *,
    source: str,
    describe_row: Callable[[int], str],
    on_bad_row: str,
    skipped: Counter,
) -> tuple[list[Any], list[int]]:
    """``work(row)`` for every row: (results, their row numbers). A BadRow raises PreferenceDataError naming the
    row, or with ``on_bad_row="skip"`` is counted in ``skipped`` by its summary."""
    results, kept = [], []
    for number, row in zip(row_numbers, rows):
        try:
            results.append(work(row))
            kept.append(number)
        except BadRow as bad:
            if on_bad_row == "error":
                raise PreferenceDataError(
                    f"{source} {describe_row(number)}: {bad} (set on_bad_row: skip to skip such rows)"
                ) from None
            skipped[bad.summary] += 1
    return results, kept


def report_skipped(skipped: Counter, kept: int, rows: Sequence[Any], source: str, hint: Callable[[], str]) -> None:
    """Log how many rows were skipped and why; all of them skipped is an error (``hint()`` may say why)."""
    if not skipped:
        return
    reasons = ", ".join(f"{n} {why}" for why, n in skipped.most_common())
    if not kept:
        raise PreferenceDataError(f"{source}: all {len(rows)} rows were skipped as bad: {reasons}" + hint())
    log.warning("%s: skipped %d of %d rows: %s", source, sum(skipped.values()), len(rows), reasons)


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
    train_turns: Literal["final", "all"] = "final",
) -> PreferenceDataset:
    """Parse, tokenize and truncate ``rows`` (dicts) into a :class:`PreferenceDataset`.

    ``row_numbers`` are the rows' positions in ``source`` for error messages (default 0..n-1), and
    ``describe_row(number)`` says where that is (default ``"row N"``). ``column_map`` maps our names (prompt /
    chosen / rejected / system) to the rows' column names.
    """
    max_length = check_tokenize_arguments(tokenizer, FORMATS, format, column_map, max_length, max_prompt_length,
                                          on_bad_row)  # fmt: skip
    column_map = dict(column_map or {})
    row_numbers = list(row_numbers) if row_numbers is not None else list(range(len(rows)))

    def tokenize(raw: dict[str, Any]) -> dict[str, list[int]]:
        row = map_columns(raw, column_map)
        fmt = detect_format(row) if format == "auto" else format
        if fmt is None and "completion" in row and "chosen" not in row:
            raise BadRow("an unpaired row (prompt, completion, label): read such data with "
                         "dpo_components.data.unpaired_dataset and train it with an unpaired loss (KTOLoss)",
                         "unpaired rows (prompt, completion, label) in a preference dataset")  # fmt: skip
        if fmt is None:
            raise BadRow(
                f"cannot detect the preference format from columns {sorted(row)} (chosen: "
                f"{type(row.get('chosen')).__name__}); set format to one of {FORMATS}, and column_map "
                "if the columns are named differently",
                "the preference format cannot be detected",
            )
        return _tokenize_pair(tokenizer, row, fmt, max_length, max_prompt_length, train_turns)

    if train_turns not in ("final", "all"):
        raise ValueError(f"train_turns must be 'final' or 'all', got '{train_turns}'")
    skipped = Counter()
    with own_truncation(tokenizer):
        results, kept_rows = each_row(rows, row_numbers, tokenize, source=source, on_bad_row=on_bad_row,
                                      describe_row=describe_row or (lambda n: f"row {n}"), skipped=skipped)  # fmt: skip
    report_skipped(skipped, len(results), rows, source, lambda: _format_hint(rows, format, column_map))
    samples = [sample for sample, _ in results]
    dataset = PreferenceDataset(samples, source, skipped, kept_rows)
    dataset.report = DataReport.of(dataset, len(rows), [cuts for _, cuts in results], max_length)
    return dataset


def _format_hint(rows: Any, fmt: str, column_map: dict[str, str] | None) -> str:
    """When every row was bad under a given ``format``: the format the first row looks like, if another one."""
    if fmt == "auto" or not len(rows):
        return ""
    try:
        looks_like = detect_format(map_columns(dict(rows[0]), column_map or {}))
    except BadRow:
        return ""
    if looks_like is None or looks_like == fmt:
        return ""
    return (f". The rows look like format '{looks_like}', not '{fmt}': set format={looks_like} (dataset.format="
            f"{looks_like} on the command line) or format=auto")


def desirable_of(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """What a collator adds for unpaired rows (KTO): ``{"desirable": [B] bool}``; ``{}`` for pairs."""
    if "desirable" not in batch[0]:
        return {}
    return {"desirable": torch.tensor([bool(sample["desirable"]) for sample in batch])}


def labels_of(ids: list[int], masked: list[bool]) -> list[int]:
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


def _unparsable_line(path: str) -> str | None:
    """"<file> line N: what is wrong" for the first line of a local JSON-lines, JSON or CSV file that does not
    parse, else None (read only after ``datasets`` failed on the file, to say where)."""
    file = Path(path)
    if not file.is_file():
        return None
    if file.suffix in (".jsonl", ".json"):
        with open(file, encoding="utf-8", errors="replace") as f:  # line by line: the file may be large
            first = True
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as error:
                    if first and line.lstrip()[:1] in ("[", "{"):  # perhaps one document over many lines
                        return _document_error(file)  # where it breaks; None: it parses, the failure is elsewhere
                    return f"{file} line {number}: not valid JSON ({error.msg}, column {error.colno})"
                if not isinstance(row, dict):
                    if first and isinstance(row, list):  # a JSON array on one line: a document of rows
                        return None
                    return f"{file} line {number}: a JSON {type(row).__name__}, where a row (a JSON object) belongs"
                first = False
        return None
    if file.suffix in (".csv", ".tsv"):
        with open(file, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f, delimiter="\t" if file.suffix == ".tsv" else ",")
            header: list[str] | None = None
            try:
                for record in reader:
                    if not record:
                        continue
                    if header is None:
                        header = record
                    elif len(record) > len(header):
                        return f"{file} line {reader.line_num}: {len(record)} fields, the header has {len(header)}"
            except csv.Error as error:
                return f"{file} line {reader.line_num}: {error}"
    return None


def _document_error(file: Path) -> str | None:
    """Where a file read as one JSON document breaks, or None if it parses."""
    try:
        json.loads(file.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as error:
        return f"{file} line {error.lineno}: not valid JSON ({error.msg}, column {error.colno})"
    return None


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


def load_rows(
    source: str,
    data_files: str | list[str] | None,
    split: str,
    column_map: dict[str, str] | None,
    holdout_fraction: float,
    part: str,
    holdout_seed: int,
    **load_dataset_kwargs: Any,
) -> tuple[HFDataset, list[int], str]:
    """(rows, each row's index in its split, where they come from, for messages) of a split, or of its seeded
    train or held-out part; refuses empty files and splits and a ``column_map`` naming a missing column."""
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
        for path in _files(data_files):
            if bad := _unparsable_line(path):
                raise PreferenceDataError(bad) from None
        if isinstance(error, ValueError) and str(error).startswith("Unknown split"):  # a hub split on a local file
            raise PreferenceDataError(
                f"{where}: {error} Set the split to one of those (a local JSON/CSV/Parquet file has one split, "
                "'train'; a slice such as 'train[:500]' or 'train[90%:]' takes part of it), e.g. dataset.split=train"
            ) from None
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
    return rows, numbers, where


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
    train_turns: Literal["final", "all"] = "final",
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
        train_turns: for ``implicit`` / ``hh`` rows (two whole conversations), which assistant turns after the
            shared prefix train: ``"final"`` (default) the last one, the earlier ones being context; ``"all"`` every
            one. Tool results and user turns never train; a ``conversational`` completion trains all its
            assistant turns.
        **load_dataset_kwargs: passed to ``datasets.load_dataset`` (``name``, ``data_dir``, ``revision``, ...).
    """
    rows, numbers, where = load_rows(source, data_files, split, column_map, holdout_fraction, part, holdout_seed,
                                     **load_dataset_kwargs)  # fmt: skip
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
        train_turns=train_turns,
    )
