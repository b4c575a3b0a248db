"""Preference data, from a dataset row to a batch.

    formats.py         a row (explicit, conversational, implicit, HH-RLHF; column_map) -> prompt/chosen/rejected
    chat.py            a torchtune tokenizer of any family: chat format, generation prompt, stop tokens, decoding
    dataset.py         ``preference_dataset`` (the YAML ``dataset._component_``): load, tokenize, truncate, bad rows
    unpaired.py        ``unpaired_dataset``: (prompt, completion, label) rows for KTO, with their KL completions
    collate.py         the [2B, L] batch, the recipe's collator, rows that do not fit the model
    prefix_sharing.py  the [prompt | chosen | rejected] row layout and its attention mask
    order.py           the seeded order of each epoch, batches of similar length

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

