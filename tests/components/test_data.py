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
    with pytest.raises(PreferenceDataError, match=r"row 0 \(line 1\): 'chosen' must be a list"):
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
    assert f"{path} (split 'train') row 2 (line 3): {reason}" in str(error.value)


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


def test_truncation_cuts_prompt_start_at_a_word_and_keeps_response_tokens(tokenizer, tmp_path):
    long_prompt = " ".join(f"the film {i} was dull" for i in range(40))
    row = {"prompt": long_prompt, "chosen": "great and the cast was superb . " * 10, "rejected": "dull ."}
    full = build(tokenizer, write(tmp_path, [row]), max_length=1000)[0]
    sample = build(tokenizer, write(tmp_path, [row]), max_length=64, max_prompt_length=40)[0]
    # The longest word-aligned end of the prompt whose chat-format prompt fits 40 tokens, found by a linear scan.
    gen = lambda text: tokenizer.tokenize_messages([Message("user", text), Message("assistant", "")],
                                                   add_end_tokens=False)[0]  # fmt: skip
    words = long_prompt.split(" ")
    kept = next(" ".join(words[i:]) for i in range(len(words)) if len(gen(" ".join(words[i:]))) <= 40)
    assert sample["prompt_ids"] == gen(kept)  # BOS, header and the end of the prompt (the latest text), intact
    assert kept.endswith("the film 39 was dull") and len(kept) < len(long_prompt)
    budget = 64 - len(sample["prompt_ids"])
    assert sample["chosen_response_ids"] == full["chosen_response_ids"][:budget]  # the rest of max_length
    assert sample["rejected_response_ids"] == full["rejected_response_ids"]  # short enough already
    assert max(build(tokenizer, write(tmp_path, [row]), max_length=64, max_prompt_length=40).sample_lengths()) <= 64


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
    with pytest.raises(
        PreferenceDataError, match=r"row 1 \(line 2\): prompt of .* tokens leaves no room for a response"
    ):
        build(tokenizer, write(tmp_path, rows), max_length=32)


def test_identical_after_truncation_is_a_bad_row(tokenizer, tmp_path):
    row = {"prompt": "the plot was", "chosen": "dull . " * 20 + "great .", "rejected": "dull . " * 20 + "awful ."}
    with pytest.raises(PreferenceDataError, match="identical after truncation to 24 tokens"):
        build(tokenizer, write(tmp_path, [row]), max_length=24, max_prompt_length=18)


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
    with pytest.raises(PreferenceDataError, match=r"row 7 \(line 8\): chosen and rejected are identical"):
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


# ------------------------------------------------------------------- odd formats and bad inputs (issue 12)


def test_mapped_columns_win_over_columns_with_our_names(tokenizer, tmp_path):
    # The original chosen/rejected columns come after the mapped ones in each row: the mapping must still win.
    rows = [{"prompt": "the plot was", "chosen_response": "great .", "rejected_response": "dull .",
             "chosen": "WRONG chosen .", "rejected": "WRONG rejected ."}]  # fmt: skip
    ds = build(
        tokenizer, write(tmp_path, rows), column_map={"chosen": "chosen_response", "rejected": "rejected_response"}
    )
    check_sample(tokenizer, ds[0], [{"role": "user", "content": "the plot was"}], "great .", "dull .")
    swapped = build(tokenizer, write(tmp_path, rows), column_map={"chosen": "rejected", "rejected": "chosen"})
    check_sample(
        tokenizer, swapped[0], [{"role": "user", "content": "the plot was"}], "WRONG rejected .", "WRONG chosen ."
    )


def test_column_map_naming_a_missing_column_is_an_error(tokenizer, tmp_path):
    path = write(tmp_path, EXPLICIT)
    with pytest.raises(PreferenceDataError, match=r"column_map\['chosen'\] names column 'response_j', which is not"):
        build(tokenizer, path, column_map={"chosen": "response_j"})
    with pytest.raises(ValueError, match=r"column_map keys must be among .* got \['answer'\]"):
        build(tokenizer, path, column_map={"answer": "chosen"})


def test_format_is_detected_per_row_inside_bad_row_handling(tokenizer, tmp_path):
    rows = [{"prompt": "p", "chosen": None, "rejected": "b ."}, *EXPLICIT]
    path = write(tmp_path, rows)
    ds = build(tokenizer, path, on_bad_row="skip")
    assert len(ds) == 2 and ds.skipped == {"missing 'chosen' (no such column, or a null value)": 1}
    with pytest.raises(PreferenceDataError, match=r"row 0 \(line 1\): missing 'chosen'"):
        build(tokenizer, path)
    undetectable = write(tmp_path, [{"prompt": "p", "chosen": 3, "rejected": 4}, *EXPLICIT], "u.jsonl")
    with pytest.raises(PreferenceDataError, match=r"u.jsonl \(split 'train'\) row 0 \(line 1\): cannot detect"):
        build(tokenizer, undetectable)


@pytest.mark.parametrize("name", ["e.jsonl", "e.json", "e.parquet", "e.csv"])
def test_empty_file_is_named(tokenizer, tmp_path, name):
    path = tmp_path / name
    if name.endswith(".parquet"):
        pd.DataFrame({"prompt": [], "chosen": [], "rejected": []}).to_parquet(path)
    else:
        path.write_text({"e.jsonl": "\n", "e.json": "[]\n", "e.csv": "prompt,chosen,rejected\n"}[name])
    source = {"e.jsonl": "json", "e.json": "json", "e.parquet": "parquet", "e.csv": "csv"}[name]
    with pytest.raises(PreferenceDataError, match=f"{path}: the file holds no rows"):
        build(tokenizer, str(path), source=source)


def test_empty_slice_and_all_rows_skipped_are_errors(tokenizer, tmp_path):
    path = write(tmp_path, EXPLICIT)
    with pytest.raises(PreferenceDataError, match=r"\(split 'train\[2:\]'\): no rows"):
        build(tokenizer, path, split="train[2:]")
    bad = write(tmp_path, [{"prompt": "p", "chosen": "a .", "rejected": "a ."}] * 2, "bad.jsonl")
    with pytest.raises(
        PreferenceDataError, match="all 2 rows were skipped as bad: 2 chosen and rejected are identical"
    ):
        build(tokenizer, bad, on_bad_row="skip")


def test_system_column_becomes_the_system_turn(tokenizer, tmp_path):
    # Intel/orca_dpo_pairs: system, question, chosen, rejected.
    rows = [{"system": "be kind", "question": "the plot was", "chosen": "great .", "rejected": "dull ."},
            {"system": "", "question": "the music felt", "chosen": "moving .", "rejected": "weak ."}]  # fmt: skip
    ds = build(tokenizer, write(tmp_path, rows), column_map={"prompt": "question"})
    system_turn = {"role": "system", "content": "be kind"}
    check_sample(tokenizer, ds[0], [system_turn, {"role": "user", "content": "the plot was"}], "great .", "dull .")
    check_sample(tokenizer, ds[1], [{"role": "user", "content": "the music felt"}], "moving .", "weak .")
    renamed = [
        {"sys": r["system"], "prompt": r["question"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows
    ]
    assert build(tokenizer, write(tmp_path, renamed), column_map={"system": "sys"})[0] == ds[0]
    twice = {
        "system": "be kind",
        "prompt": [system_turn, {"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "a ."}],
        "rejected": [{"role": "assistant", "content": "b ."}],
    }
    with pytest.raises(PreferenceDataError, match="both a 'system' column and a system turn"):
        build(tokenizer, write(tmp_path, [twice], "twice.jsonl"))


def test_sharegpt_turns_and_content_lists_are_normalized(tokenizer, tmp_path):
    prompt = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "the plot was"}]
    sharegpt = {
        "prompt": [{"from": "system", "value": "be kind"}, {"from": "human", "value": "the plot was"}],
        "chosen": [{"from": "gpt", "value": "great ."}],
        "rejected": [{"from": "gpt", "value": "dull ."}],
    }
    parts = lambda text: [{"type": "text", "text": text}]
    content_lists = {
        "prompt": [{"role": "system", "content": parts("be kind")}, {"role": "user", "content": parts("the plot was")}],
        "chosen": [
            {"role": "assistant", "content": [{"type": "text", "text": "great"}, {"type": "text", "text": " ."}]}
        ],
        "rejected": [{"role": "assistant", "content": parts("dull .")}],
    }
    # LLaMA-Factory's ShareGPT preference rows: the prompt turns, and one message per response.
    llama_factory = {
        "conversations": sharegpt["prompt"],
        "chosen": sharegpt["chosen"][0],
        "rejected": sharegpt["rejected"][0],
    }
    for i, row in enumerate([sharegpt, content_lists]):
        check_sample(tokenizer, build(tokenizer, write(tmp_path, [row], f"{i}.jsonl"))[0], prompt, "great .", "dull .")
    ds = build(tokenizer, write(tmp_path, [llama_factory], "lf.jsonl"), column_map={"prompt": "conversations"})
    check_sample(tokenizer, ds[0], prompt, "great .", "dull .")
    image = {**content_lists, "prompt": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}]}
    with pytest.raises(PreferenceDataError, match=r"'prompt'\[0\] has a content part of type 'image'"):
        build(tokenizer, write(tmp_path, [image], "img.jsonl"))


def test_explicit_prompt_in_hh_form_is_split_into_turns(tokenizer, tmp_path):
    # Dahoas/full-hh-rlhf: the prompt holds the turns and ends with "Assistant:"; responses start with a space.
    row = {"prompt": "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: the plot was\n\nAssistant:",
           "chosen": " great .", "rejected": " dull ."}  # fmt: skip
    turns = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "the plot was"}]  # fmt: skip
    check_sample(tokenizer, build(tokenizer, write(tmp_path, [row]))[0], turns, "great .", "dull .")
    plain = {"prompt": "Human: not a transcript", "chosen": "a .", "rejected": "b ."}  # no closing "Assistant:"
    check_sample(tokenizer, build(tokenizer, write(tmp_path, [plain], "p.jsonl"))[0],
                 [{"role": "user", "content": plain["prompt"]}], "a .", "b .")  # fmt: skip


def test_rows_are_numbered_in_the_whole_file(tokenizer, tmp_path):
    rows = [{"prompt": f"p {i}", "chosen": "a .", "rejected": "b ."} for i in range(8)]
    rows[5]["rejected"] = "a ."
    jsonl = tmp_path / "gaps.jsonl"  # blank lines, which datasets skips, shift the line numbers
    jsonl.write_text("\n".join(json.dumps(r) + ("\n" if i == 2 else "") for i, r in enumerate(rows)) + "\n")
    with pytest.raises(PreferenceDataError, match=r"\(split 'train\[4:7\]'\) row 5 \(line 7\): chosen and rejected"):
        build(tokenizer, str(jsonl), split="train[4:7]")
    rows[1]["prompt"] = "a prompt\nover two lines"  # a quoted CSV field spanning lines
    with pytest.raises(PreferenceDataError, match=r"row 5 \(line 8\): chosen and rejected"):
        build(tokenizer, write(tmp_path, rows, "r.csv"), source="csv")
    with pytest.raises(PreferenceDataError, match=r"\(split 'train'\) row 5: chosen and rejected"):
        build(tokenizer, write(tmp_path, rows, "r.parquet"), source="parquet")


def test_whitespace_only_difference_is_not_called_truncation(tokenizer, tmp_path):
    row = {"prompt": "the plot was", "chosen": "great .", "rejected": " great .  "}
    with pytest.raises(PreferenceDataError, match="tokenize identically .* differ only in .* whitespace") as error:
        build(tokenizer, write(tmp_path, [row]))
    assert "truncation" not in str(error.value)


def test_skip_summary_buckets_by_reason_not_by_length(tokenizer, tmp_path, caplog):
    rows = [EXPLICIT[0]] + [
        {"prompt": " ".join(["the plot was"] * n), "chosen": "great .", "rejected": "dull ."} for n in (20, 25, 30)
    ]
    ds = build(tokenizer, write(tmp_path, rows), max_length=32, on_bad_row="skip")
    assert len(ds) == 1 and ds.skipped == {"prompt leaves no room for a response within max_length=32": 3}
    assert "skipped 3 of 4 rows: 3 prompt leaves no room for a response within max_length=32" in caplog.text


def test_hh_row_ending_in_assistant_without_space(tokenizer, tmp_path):
    row = {
        "chosen": "\n\nHuman: the plot was\n\nAssistant:",
        "rejected": "\n\nHuman: the plot was\n\nAssistant: dull .",
    }
    with pytest.raises(PreferenceDataError, match="row 0 .*: chosen response is empty"):
        build(tokenizer, write(tmp_path, [row]))
    row["chosen"] += "great ."  # "Assistant:great ." is an assistant turn too
    check_sample(tokenizer, build(tokenizer, write(tmp_path, [row], "ok.jsonl"))[0],
                 [{"role": "user", "content": "the plot was"}], "great .", "dull .")  # fmt: skip


def test_truncation_drops_whole_oldest_turns_and_keeps_the_system_turn(tokenizer, tmp_path):
    system = {"role": "system", "content": "be kind"}
    exchanges = []
    for i in range(6):
        exchanges += [{"role": "user", "content": f"tell me about film {i} and its plot"},
                      {"role": "assistant", "content": f"film {i} was fine and the cast was good ."}]  # fmt: skip
    last = {"role": "user", "content": "the plot was"}
    row = {"prompt": [system, *exchanges, last], "chosen": [{"role": "assistant", "content": "great ."}],
           "rejected": [{"role": "assistant", "content": "dull ."}]}  # fmt: skip
    gen_len = lambda msgs: generation_prompt_length(tokenizer, msgs)
    limit = gen_len([system, *exchanges[-4:], last])  # room for exactly the two latest exchanges
    sample = build(tokenizer, write(tmp_path, [row]), max_length=limit + 8, max_prompt_length=limit)[0]
    check_sample(tokenizer, sample, [system, *exchanges[-4:], last], "great .", "dull .")
    # A limit one token short drops one more whole exchange (never half of one).
    sample = build(tokenizer, write(tmp_path, [row]), max_length=limit + 8, max_prompt_length=limit - 1)[0]
    check_sample(tokenizer, sample, [system, *exchanges[-2:], last], "great .", "dull .")


def test_truncation_never_cuts_a_character_in_half(tokenizer, tmp_path):
    text = " ".join(["héllo wörld ünïcode ☃"] * 30)
    row = {"prompt": text, "chosen": "great .", "rejected": "dull ."}
    for limit in range(24, 40, 3):
        sample = build(tokenizer, write(tmp_path, [row]), max_length=limit + 8, max_prompt_length=limit)[0]
        decoded = tokenizer.decode(sample["prompt_ids"], skip_special_tokens=False)
        assert "\ufffd" not in decoded and len(sample["prompt_ids"]) <= limit
        kept = decoded.split("<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
        assert text.endswith(kept) and (" " + kept) in text  # a whole-word end of the prompt


def test_the_data_report_counts_every_case_exactly(tokenizer, tmp_path):
    """A file built to hit each case: whole pairs, a prompt cut, a chosen cut alone, a rejected cut alone, both cut,
    and three bad rows of two reasons. The trained tokens per response are counted independently: the response's
    tokens plus its end of turn, up to what the prompt leaves of max_length."""
    short, long = "great .", " ".join(["moving and the cast was superb ."] * 6)  # 42 tokens
    rows = [
        {"prompt": "the plot was", "chosen": short, "rejected": "dull ."},
        {"prompt": "the music felt", "chosen": "moving .", "rejected": "weak and dull ."},
        {"prompt": " ".join(["the plot was dull ."] * 12), "chosen": long, "rejected": short},  # prompt, chosen cut
        {"prompt": "the plot was", "chosen": long, "rejected": short},  # chosen cut alone
        {"prompt": "the plot was", "chosen": short, "rejected": long},  # rejected cut alone
        {"prompt": "the cast was", "chosen": long, "rejected": "weak . " + long},  # both cut
        {"prompt": "the plot was", "chosen": short},  # bad: no rejected
        {"prompt": "the plot was", "chosen": short, "rejected": short},  # bad: identical
        {"prompt": "the end was", "chosen": "sad ."},  # bad: no rejected
    ]
    max_length, max_prompt_length = 40, 24  # a short prompt takes 17 tokens, the long one 74
    data = build(tokenizer, write(tmp_path, rows), max_length=max_length, max_prompt_length=max_prompt_length,
                 on_bad_row="skip")
    report = data.report
    assert (report.rows_read, report.rows_kept, report.samples) == (9, 6, 6)
    assert report.skipped == {"missing 'rejected' (no such column, or a null value)": 2,
                              "chosen and rejected are identical": 1}  # fmt: skip
    assert (report.prompt_cut, report.cut, report.one_sided_cut) == (1, {"chosen": 3, "rejected": 2}, 3)
    for side in ("chosen", "rejected"):
        counts = []
        for i, row in zip(range(len(data)), [r for r in rows if "rejected" in r and r["chosen"] != r["rejected"]]):
            budget = max_length - len(data[i]["prompt_ids"])
            counts.append(min(budget, len(tokenizer.encode(row[side], add_bos=False, add_eos=False)) + 1))
        stats = report.trained_tokens[side]
        assert stats["mean"] == round(sum(counts) / len(counts), 2) and stats["max"] == max(counts)
        assert stats["p50"] == float(torch.tensor(counts, dtype=torch.float64).quantile(0.5))
    assert "3 of 6 pairs (50.0%) have one response cut by max_length=40" in report.warning()
