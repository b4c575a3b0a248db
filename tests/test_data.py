"""Preference dataset builder and collator: every format, truncation, bad rows, held-out split."""

import json

import pandas as pd
import pytest
import torch
from torchtune.data import Message

from dpo_components.data import (
    IGNORE_INDEX,
    PreferenceDataError,
    collate_preference_batch,
    preference_dataset,
)

EXPLICIT = [
    {"prompt": "the plot was", "chosen": "great .", "rejected": "dull ."},
    {"prompt": "the music felt", "chosen": "moving and the cast was superb .", "rejected": "weak ."},
]


def write(tmp_path, rows, name="prefs.jsonl"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    elif name.endswith(".parquet"):
        pd.DataFrame(rows).to_parquet(path)
    elif name.endswith(".csv"):
        pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def build(tokenizer, path, source="json", **kwargs):
    kwargs.setdefault("max_length", 256)
    return preference_dataset(tokenizer, source=source, data_files=path, **kwargs)


def expected_tokens(tokenizer, prompt_messages, response):
    """The chat-format tokens torchtune's own tokenizer gives for prompt + one assistant response."""
    messages = [Message(m["role"], m["content"], masked=True) for m in prompt_messages]
    messages.append(Message("assistant", response, masked=False))
    return tokenizer.tokenize_messages(messages)


def generation_prompt_length(tokenizer, prompt_messages):
    messages = [Message(m["role"], m["content"]) for m in prompt_messages] + [Message("assistant", "")]
    return len(tokenizer.tokenize_messages(messages, add_end_tokens=False)[0])


def check_sample(tokenizer, sample, prompt_messages, chosen, rejected):
    start = generation_prompt_length(tokenizer, prompt_messages)
    for side, response in (("chosen", chosen), ("rejected", rejected)):
        tokens, mask = expected_tokens(tokenizer, prompt_messages, response)
        assert not mask[start - 1] and not mask[start]  # the header ends the prompt part; the content follows
        assert sample["prompt_ids"] == tokens[:start]
        assert sample[f"{side}_response_ids"] == tokens[start:]
        assert sample[f"{side}_labels"] == [IGNORE_INDEX if m else t for t, m in zip(tokens[start:], mask[start:])]


@pytest.mark.parametrize(
    "name,source", [("p.jsonl", "json"), ("p.json", "json"), ("p.parquet", "parquet"), ("p.csv", "csv")]
)
def test_explicit_format_from_each_file_type(tokenizer, tmp_path, name, source):
    ds = build(tokenizer, write(tmp_path, EXPLICIT, name), source=source)
    assert len(ds) == 2
    for sample, row in zip(ds, EXPLICIT):
        check_sample(tokenizer, sample, [{"role": "user", "content": row["prompt"]}], row["chosen"], row["rejected"])


def test_column_map(tokenizer, tmp_path):
    rows = [{"question": r["prompt"], "response_j": r["chosen"], "response_k": r["rejected"]} for r in EXPLICIT]
    ds = build(
        tokenizer,
        write(tmp_path, rows),
        column_map={"prompt": "question", "chosen": "response_j", "rejected": "response_k"},
    )
    check_sample(
        tokenizer,
        ds[1],
        [{"role": "user", "content": EXPLICIT[1]["prompt"]}],
        EXPLICIT[1]["chosen"],
        EXPLICIT[1]["rejected"],
    )


def test_conversational_format(tokenizer, tmp_path):
    prompt = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "the plot was"}]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "great ."}],
        "rejected": [{"role": "assistant", "content": "dull ."}],
    }
    ds = build(tokenizer, write(tmp_path, [row]))
    check_sample(tokenizer, ds[0], prompt, "great .", "dull .")


def test_implicit_prompt_format(tokenizer, tmp_path):
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "the plot was"},
    ]
    row = {
        "prompt": "ignored",
        "chosen": turns + [{"role": "assistant", "content": "great ."}],
        "rejected": turns + [{"role": "assistant", "content": "dull ."}],
    }
    ds = build(tokenizer, write(tmp_path, [row]))
    check_sample(tokenizer, ds[0], turns, "great .", "dull .")


def test_hh_rlhf_format(tokenizer, tmp_path):
    shared = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: the plot was"
    row = {"chosen": shared + "\n\nAssistant: great .", "rejected": shared + "\n\nAssistant: dull ."}
    ds = build(tokenizer, write(tmp_path, [row]))
    turns = [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "the plot was"},
    ]
    check_sample(tokenizer, ds[0], turns, "great .", "dull .")


def test_explicit_format_can_be_forced(tokenizer, tmp_path):
    ds = build(tokenizer, write(tmp_path, EXPLICIT), format="explicit")
    assert len(ds) == 2
    with pytest.raises(PreferenceDataError, match="row 0: 'chosen' must be a list"):
        build(tokenizer, write(tmp_path, EXPLICIT), format="implicit")


@pytest.mark.parametrize(
    "bad,reason",
    [
        ({"prompt": "p", "chosen": "a ."}, "missing 'rejected' (no such column, or a null value)"),
        ({"prompt": "p", "chosen": "a .", "rejected": 3}, "'rejected' must be a str, got int"),
        ({"prompt": "p", "chosen": "  ", "rejected": "b ."}, "chosen response is empty"),
        ({"prompt": "p", "chosen": "same .", "rejected": "same ."}, "chosen and rejected are identical"),
    ],
)
def test_bad_row_error_names_file_and_row(tokenizer, tmp_path, bad, reason):
    path = write(tmp_path, [EXPLICIT[0], EXPLICIT[1], bad])
    with pytest.raises(PreferenceDataError) as error:
        build(tokenizer, path, format="explicit")
    assert f"{path} (split 'train') row 2: {reason}" in str(error.value)


def test_bad_rows_skipped_and_counted(tokenizer, tmp_path, caplog):
    rows = [
        EXPLICIT[0],
        {"prompt": "p", "chosen": "x .", "rejected": "x ."},
        EXPLICIT[1],
        {"prompt": "p", "chosen": "", "rejected": "b ."},
        {"prompt": "p", "chosen": "y .", "rejected": "y ."},
    ]
    ds = build(tokenizer, write(tmp_path, rows), on_bad_row="skip")
    assert len(ds) == 2
    assert ds.skipped == {"chosen and rejected are identical": 2, "chosen response is empty": 1}
    assert "skipped 3 of 5 rows: 2 chosen and rejected are identical, 1 chosen response is empty" in caplog.text


def test_truncation_cuts_prompt_end_first_and_keeps_response_tokens(tokenizer, tmp_path):
    long_prompt = " ".join(["the film was dull"] * 40)
    row = {"prompt": long_prompt, "chosen": "great and the cast was superb . " * 10, "rejected": "dull ."}
    full = build(tokenizer, write(tmp_path, [row]), max_length=1000)[0]
    ds = build(tokenizer, write(tmp_path, [row]), max_length=64, max_prompt_length=40)
    sample = ds[0]
    assert len(sample["prompt_ids"]) == 40
    assert sample["prompt_ids"][0] == tokenizer.bos_id  # BOS kept ...
    assert sample["prompt_ids"][1:] == full["prompt_ids"][-39:]  # ... and the end of the prompt (the latest turn)
    assert sample["chosen_response_ids"] == full["chosen_response_ids"][:24]  # the rest of max_length
    assert sample["rejected_response_ids"] == full["rejected_response_ids"]  # short enough already
    assert max(ds.sample_lengths()) == 64


def test_every_sample_keeps_a_response_token(tokenizer, tmp_path):
    rows = [
        {"prompt": " ".join(["the plot was"] * n), "chosen": "great .", "rejected": "dull ."} for n in range(1, 60, 7)
    ]
    ds = build(tokenizer, write(tmp_path, rows), max_length=32, max_prompt_length=31)
    assert len(ds) == len(rows)
    for sample in ds:
        for side in ("chosen", "rejected"):
            assert sum(label != IGNORE_INDEX for label in sample[f"{side}_labels"]) >= 1
            assert len(sample["prompt_ids"]) + len(sample[f"{side}_response_ids"]) <= 32


def test_prompt_that_cannot_fit_is_a_bad_row(tokenizer, tmp_path):
    rows = [EXPLICIT[0], {"prompt": " ".join(["the plot was"] * 30), "chosen": "great .", "rejected": "dull ."}]
    with pytest.raises(PreferenceDataError, match="row 1: prompt of .* tokens leaves no room for a response"):
        build(tokenizer, write(tmp_path, rows), max_length=32)


def test_identical_after_truncation_is_a_bad_row(tokenizer, tmp_path):
    row = {"prompt": "the plot was", "chosen": "dull . " * 20 + "great .", "rejected": "dull . " * 20 + "awful ."}
    with pytest.raises(PreferenceDataError, match="identical after truncation to 24 tokens"):
        build(tokenizer, write(tmp_path, [row]), max_length=24, max_prompt_length=12)


def test_max_prompt_length_must_leave_room(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="max_prompt_length=64 must be in"):
        build(tokenizer, write(tmp_path, EXPLICIT), max_length=64, max_prompt_length=64)


def test_tokenizer_truncation_is_switched_off_and_restored(tokenizer, tmp_path):
    tokenizer.max_seq_len = 8  # would cut every sample in torchtune's tokenizer
    try:
        ds = build(tokenizer, write(tmp_path, EXPLICIT), max_length=None, max_prompt_length=None)
    except PreferenceDataError as error:  # the prompt alone is longer than 8 tokens: our rule, not theirs
        assert "leaves no room" in str(error)
    else:
        raise AssertionError(f"expected a bad row, got {len(ds)} samples")
    finally:
        assert tokenizer.max_seq_len == 8
        tokenizer.max_seq_len = None


def test_holdout_split_is_disjoint_complete_and_seeded(tokenizer, tmp_path):
    rows = [{"prompt": f"the plot was {i}", "chosen": "great .", "rejected": "dull ."} for i in range(20)]
    path = write(tmp_path, rows)
    train = build(tokenizer, path, holdout_fraction=0.25)
    heldout = build(tokenizer, path, holdout_fraction=0.25, part="heldout")
    again = build(tokenizer, path, holdout_fraction=0.25, part="heldout")
    prompts = lambda ds: {tokenizer.decode(s["prompt_ids"]) for s in ds}
    assert len(train) == 15 and len(heldout) == 5
    assert prompts(train).isdisjoint(prompts(heldout)) and len(prompts(train) | prompts(heldout)) == 20
    assert prompts(heldout) == prompts(again)
    assert prompts(heldout) != prompts(build(tokenizer, path, holdout_fraction=0.25, part="heldout", holdout_seed=1))


def test_holdout_errors_name_the_original_row(tokenizer, tmp_path):
    rows = [{"prompt": f"p {i}", "chosen": "a .", "rejected": "b ."} for i in range(10)]
    rows[7]["rejected"] = "a ."
    path = write(tmp_path, rows)
    with pytest.raises(PreferenceDataError, match="row 7: chosen and rejected are identical"):
        for part in ("train", "heldout"):
            build(tokenizer, path, holdout_fraction=0.3, part=part)


def test_collator_concatenates_chosen_then_rejected(tokenizer, tmp_path):
    ds = build(tokenizer, write(tmp_path, EXPLICIT))
    batch = collate_preference_batch([ds[0], ds[1]], padding_idx=tokenizer.pad_id, pad_to_multiple_of=8)
    input_ids, labels = batch["input_ids"], batch["labels"]
    assert input_ids.shape[0] == 4 and input_ids.shape[1] % 8 == 0
    assert batch["index"].tolist() == [0, 1]
    for row, (sample, side) in enumerate(
        [(ds[0], "chosen"), (ds[1], "chosen"), (ds[0], "rejected"), (ds[1], "rejected")]
    ):
        ids = sample["prompt_ids"] + sample[f"{side}_response_ids"]
        n = len(ids)
        assert batch["lengths"][row] == n
        assert input_ids[row, :n].tolist() == ids
        assert (input_ids[row, n:] == tokenizer.pad_id).all() and (labels[row, n:] == IGNORE_INDEX).all()
        assert (labels[row, : len(sample["prompt_ids"])] == IGNORE_INDEX).all()
        assert labels[row, len(sample["prompt_ids"]) : n].tolist() == sample[f"{side}_labels"]
    assert torch.is_tensor(labels) and labels.dtype == torch.long
