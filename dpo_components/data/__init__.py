"""Preference data, from a dataset row to a batch: row formats, chat formats, the dataset builders, collators, batch
layouts and order (each module: ``docs/architecture.md``).

The names below are the package's public API (``dpo_components.data.preference_dataset`` in a config).
"""

from dpo_components.data.chat import check_tokenizer, decode_text, generation_prompt, stop_tokens, tokenize_chat
from dpo_components.data.collate import collate_preference_batch, make_collator
from dpo_components.data.dataset import IGNORE_INDEX, PreferenceDataset, preference_dataset, tokenize_rows
from dpo_components.data.formats import COLUMNS, FORMATS, PreferenceDataError, detect_format, parse_row
from dpo_components.data.unpaired import UnpairedDataset, unpaired_dataset

__all__ = [
    "COLUMNS", "FORMATS", "IGNORE_INDEX", "PreferenceDataError", "PreferenceDataset", "check_tokenizer",
    "collate_preference_batch", "decode_text", "detect_format", "generation_prompt", "make_collator", "parse_row",
    "preference_dataset", "stop_tokens", "tokenize_chat", "tokenize_rows",
    "UnpairedDataset", "unpaired_dataset",
]  # fmt: skip
