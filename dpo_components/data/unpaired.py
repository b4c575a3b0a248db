"""Unpaired feedback for KTO: rows of (prompt, completion, label), in the batch layout of preference pairs.

Rows are TRL's unpaired preference format, ``prompt``, ``completion`` and a bool ``label`` (true: desirable,
"thumbs up"; false: undesirable), as strings (``explicit``) or message lists (``conversational``); ``column_map``
renames columns as for :func:`~dpo_components.data.preference_dataset`. A paired row of any preference format
(explicit, conversational, implicit, hh) is unrolled into two unpaired rows, (prompt, chosen, true) then (prompt,
rejected, false), as TRL's ``unpair_preference_dataset`` and the KTO paper's setting; both stay in the same part
of a ``holdout_fraction`` split. Chat format, truncation, bad-row handling and messages are those of the
preference builder (``dataset.py``): a missing or non-bool label is a bad row named by file and row, and a split
with only one class is an error.

KTO's reference point z0 is an estimate of KL(policy || reference) from *mismatched* (prompt, completion) pairs:
each row also carries a KL completion, the completion of another row, tokenized after this row's prompt. The
partner of row i is row i + m (cyclic), m the longest run of consecutive rows that share a prompt, so each
completion is some row's KL completion exactly once (the KL completions have the data's own mix of completions,
as TRL's rotation within a batch intends) and never one of the same prompt where another exists. Unlike TRL's
rotation, the partner is fixed by the data, not by the batch: the order can be shuffled, batches can be grouped
by length, and the reference's log-probs of the KL completions are precomputed and cached like any pair's.

Sample layout (so that collators, prefix sharing, the reference cache and the data order work unchanged): the
first side (``chosen_response_ids`` / ``chosen_labels``) holds the row's completion, the second side
(``rejected_*``) its KL completion, and ``desirable`` the label. The KL completion is cut to the tokens the
prompt leaves, ``max_length - len(prompt)``; whether the prompt is shortened is decided by the row's completion
alone.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Literal

from torchtune.data import Message
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from dpo_components.data.dataset import (
    PreferenceDataset,
    _line_describer,
    check_tokenize_arguments,
    each_row,
    labels_of,
    load_rows,
    own_truncation,
    report_skipped,
    tokenize_responses,
)
from dpo_components.data.formats import (
    FORMATS,
    BadRow,
    PreferenceDataError,
    detect_format,
    detect_unpaired_format,
    map_columns,
    parse_row,
    parse_unpaired_row,
    turn_key,
)
from dpo_components.data.report import DataReport
from dpo_components.data.tools import check_tool_use, parse_tools

log = logging.getLogger(__name__)


class UnpairedDataset(PreferenceDataset):
    """Tokenized unpaired rows in the pair layout (module docstring): item i has ``prompt_ids``, the completion as
    ``chosen_response_ids`` / ``chosen_labels``, the KL completion as ``rejected_response_ids`` /
    ``rejected_labels``, ``desirable`` (bool) and ``index``. ``row_numbers[i]`` is the source row (an unrolled
    pair gives two samples of one row)."""

    data_kind = "unpaired"

    @property
    def desirable_count(self) -> int:
        return sum(s["desirable"] for s in self._samples)

    @property
    def undesirable_count(self) -> int:
        return len(self) - self.desirable_count


UnpairedRow = tuple[list[Message], list[Message], bool, list[dict[str, Any]]]  # prompt, completion, desirable, tools


def _parse(raw: dict[str, Any], fmt: str, column_map: dict[str, str]) -> list[UnpairedRow]:
    """The unpaired rows of one data row: itself, or a pair's two halves (desirable first), with the row's tools."""
    row = map_columns(raw, column_map)
    tools = parse_tools(row)
    rows = [(*half, tools) for half in _halves(row, fmt)]
    for prompt, completion, _, _ in rows:
        check_tool_use(prompt + completion, tools)
    return rows


def _halves(row: dict[str, Any], fmt: str) -> list[tuple[list[Message], list[Message], bool]]:
    if "completion" in row:
        if row["completion"] is None:  # datasets fills a key missing from some rows with None
            raise BadRow("missing 'completion' (no such column, or a null value)")
        row_fmt = detect_unpaired_format(row) if fmt == "auto" else fmt
        if row_fmt is None:
            raise BadRow(f"'completion' must be a string or a list of messages, got "
                         f"{type(row['completion']).__name__}", "malformed 'completion'")  # fmt: skip
        return [parse_unpaired_row(row, row_fmt)]
    row_fmt = detect_format(row) if fmt == "auto" else fmt
    if row_fmt is None:
        raise BadRow(
            f"neither an unpaired row (prompt, completion, label) nor a preference pair: columns {sorted(row)}; "
            "set column_map if the columns are named differently",
            "neither an unpaired row nor a pair",
        )
    prompt, chosen, rejected = parse_row(row, row_fmt)
    return [(prompt, chosen, True), (prompt, rejected, False)]


def kl_partners(prompts: list[Any]) -> tuple[list[int], int]:
    """Row i's KL partner (module docstring) for rows with these prompt keys, and how many partners share the
    row's prompt (all of them when every row has one prompt, else none)."""
    n = len(prompts)
    if n < 2 or all(key == prompts[0] for key in prompts):  # one prompt for every row: another completion of it
        return [(i + 1) % max(n, 1) for i in range(n)], n
    longest = run = 1
    for i in range(1, n):
        run = run + 1 if prompts[i] == prompts[i - 1] else 1
        longest = max(longest, run)
    partners = []
    for i in range(n):
        j = (i + longest) % n
        while prompts[j] == prompts[i]:  # where a prompt repeats apart from its run: the next row with another
            j = (j + 1) % n
        partners.append(j)
    return partners, 0


def unpaired_dataset(
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
) -> UnpairedDataset:
    """Load unpaired (prompt, completion, label) rows, or pairs to unroll, and tokenize them (a YAML
    ``_component_`` for KTO). The arguments are :func:`~dpo_components.data.preference_dataset`'s; ``format`` is
    ``auto`` (per row), ``explicit`` or ``conversational`` (for unpaired and paired rows alike), or ``implicit`` /
    ``hh`` (pairs to unroll); ``column_map`` also maps ``completion`` and ``label``."""
    max_length = check_tokenize_arguments(tokenizer, FORMATS, format, column_map, max_length, max_prompt_length,
                                          on_bad_row)  # fmt: skip
    rows, numbers, where = load_rows(source, data_files, split, column_map, holdout_fraction, part, holdout_seed,
                                     **load_dataset_kwargs)  # fmt: skip
    describe_row, skipped = _line_describer(data_files), Counter()
    column_map = dict(column_map or {})
    parsed, kept = each_row(rows, numbers, lambda raw: _parse(raw, format, column_map), source=where,
                            describe_row=describe_row, on_bad_row=on_bad_row, skipped=skipped)  # fmt: skip
    items = [(number, item) for number, items in zip(kept, parsed) for item in items]
    if any(len(items_of_row) == 2 for items_of_row in parsed):
        log.info("%s: unrolled %d paired rows into desirable and undesirable rows", where,
                 sum(len(i) == 2 for i in parsed))  # fmt: skip
    keys = [tuple(turn_key(m) for m in prompt) for _, (prompt, _, _, _) in items]
    partners, same_prompt = kl_partners(keys)
    if same_prompt:
        log.warning("%s: %d rows have no row with another prompt; their KL completions are other completions of "
                    "the same prompt", where, same_prompt)  # fmt: skip

    def tokenize(i: int) -> dict[str, Any]:
        prompt, completion, desirable, tools = items[i][1]
        kl_completion = items[partners[i]][1][1]
        prompt_ids, [(ids, masked), (kl_ids, kl_masked)], cuts = tokenize_responses(
            tokenizer, prompt, [completion, kl_completion], max_length, max_prompt_length, fit=1, tools=tools
        )
        return {"prompt_ids": prompt_ids, "chosen_response_ids": ids, "chosen_labels": labels_of(ids, masked),
                "rejected_response_ids": kl_ids, "rejected_labels": labels_of(kl_ids, kl_masked),
                "desirable": desirable}, cuts  # fmt: skip

    with own_truncation(tokenizer):
        results, sample_rows = each_row(range(len(items)), [number for number, _ in items], tokenize, source=where,
                                        describe_row=describe_row, on_bad_row=on_bad_row, skipped=skipped)  # fmt: skip
    report_skipped(skipped, len(results), rows, where, lambda: "")
    dataset = UnpairedDataset([sample for sample, _ in results], where, skipped, sample_rows)
    dataset.report = DataReport.of(dataset, len(rows), [cuts for _, cuts in results], max_length)
    if not dataset.desirable_count or not dataset.undesirable_count:
        label = "true (desirable)" if dataset.desirable_count else "false (undesirable)"
        raise PreferenceDataError(
            f"{where}: all {len(dataset)} rows have label {label}; KTO learns from both classes, so a split needs "
            "desirable (label true) and undesirable (label false) rows"
        )
    log.info("%s: %d desirable and %d undesirable rows", where, dataset.desirable_count, dataset.undesirable_count)
    return dataset
