"""Tool use in preference rows: token for token the released templates' `apply_chat_template(messages, tools=...)`
(Llama 3.1+ through 3.2's template, Qwen2.5, Qwen3 in both modes) on the released vocabularies, the trained tokens
of each family decoded (assistant text and end of turn; never tool results or headers), the bad rows named, and
the data report's exact counts."""

import json

import pytest
import torch
from test_released_templates import family

from dpo_components.data import PreferenceDataError, tokenize_rows
from dpo_components.data.dataset import IGNORE_INDEX

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city today.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city."}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
]  # fmt: skip


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def calling(*calls, content=""):
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


USER = {"role": "user", "content": "What is the weather in Paris?"}
RESULT = {"role": "tool", "content": "sunny, 21 C"}
CHOSEN = [calling(call("get_weather", city="Paris")), RESULT, {"role": "assistant", "content": "It is sunny."}]
REJECTED = [calling(call("get_time", city="Paris")), {"role": "tool", "content": "14:05"},
            {"role": "assistant", "content": "It is 14:05."}]  # fmt: skip
CASES = {
    "call, result, answer": ([USER], CHOSEN, REJECTED),
    "system and a call with text": ([{"role": "system", "content": "Be brief."}, USER],
                                    [calling(call("get_weather", city="Paris"), content="Let me look.")],
                                    [calling(call("get_time", city="Paris"))]),  # fmt: skip
    "parallel calls": ([USER], [calling(call("get_weather", city="Paris"), call("get_time", city="Paris")),
                                RESULT, {"role": "tool", "content": "14:05"},
                                {"role": "assistant", "content": "Sunny at 14:05."}], REJECTED),  # fmt: skip
    "multi-turn tool use": ([USER, *CHOSEN, {"role": "user", "content": "And in Rome?"}],
                            [calling(call("get_weather", city="Rome")), {"role": "tool", "content": "rain"},
                             {"role": "assistant", "content": "It rains."}],
                            [{"role": "assistant", "content": "Also sunny."}]),  # fmt: skip
    "prompt ends with a result": ([USER, CHOSEN[0], RESULT], [{"role": "assistant", "content": "It is sunny."}],
                                  [{"role": "assistant", "content": "It is 14:05."}]),  # fmt: skip
}
FAMILIES = ("llama3_1+", "qwen2_5", "qwen3", "qwen3-thinking")
EMPTY_THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module", params=FAMILIES)
def tokenizers(request):
    return request.param, *family(request.param)


def expected_sequence(name, hf, kwargs, prompt, response, not_trained, trained_end):
    """The template's conversation (prompt + response, with the tools), up to the end of turn, then our trained
    end. Qwen3 non-thinking: each assistant turn of the response after the empty think block its generation prompt
    gives it (the documented rule where the template is not prefix-consistent)."""
    text = hf.apply_chat_template(prompt + response, tools=TOOLS, tokenize=False, **kwargs)
    if name == "qwen3":
        head = hf.apply_chat_template(prompt, tools=TOOLS, tokenize=False, **kwargs)
        assert text.startswith(head)
        turns = text[len(head) :].split("<|im_start|>assistant\n")
        text = head + "<|im_start|>assistant\n".join(
            [turns[0], *(t if t.startswith("<think>") else EMPTY_THINK + t for t in turns[1:])]
        )
    ids = hf.encode(text, add_special_tokens=False)
    tail = hf.encode(not_trained, add_special_tokens=False) if not_trained else []
    assert ids[len(ids) - len(tail) :] == tail
    return ids[: len(ids) - len(tail)] + (hf.encode(trained_end, add_special_tokens=False) if trained_end else [])


def trained_text(name, response):
    """What the response should train: each assistant turn's text (or calls) and its end of turn."""
    end = "<|eot_id|>" if name == "llama3_1+" else "<|im_end|>"
    out = []
    for m in response:
        if m["role"] != "assistant":
            continue
        calls = [c["function"] for c in m.get("tool_calls", [])]
        if name == "llama3_1+":
            body = m["content"] if not calls else (
                f'{{"name": "{calls[0]["name"]}", "parameters": {json.dumps(calls[0]["arguments"])}}}')
        else:
            blocks = [f'<tool_call>\n{{"name": "{c["name"]}", "arguments": {json.dumps(c["arguments"])}}}\n'
                      "</tool_call>" for c in calls]  # fmt: skip
            body = "\n".join(([m["content"]] if m["content"] else []) + blocks)
            if name == "qwen3-thinking" and m is response[-1]:
                body = EMPTY_THINK + body
        out.append(body + end)
    return "".join(out)


@pytest.mark.parametrize("case", CASES)
def test_tool_rows_are_the_released_template_token_for_token(tokenizers, case):
    name, ours, hf, kwargs, not_trained, trained_end = tokenizers
    prompt, chosen, rejected = CASES[case]
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": TOOLS}
    if name == "llama3_1+" and case == "parallel calls":  # the template raises; so does the row, named
        with pytest.raises(Exception, match="single tool-calls"):
            hf.apply_chat_template(prompt + chosen, tools=TOOLS, tokenize=False, **kwargs)
        with pytest.raises(PreferenceDataError, match="rows row 0: .*one call per turn"):
            tokenize_rows([row], ours, source="rows", max_length=4096)
        return
    sample = tokenize_rows([row], ours, source="rows", max_length=4096)[0]
    for side, response in (("chosen", chosen), ("rejected", rejected)):
        want = expected_sequence(name, hf, kwargs, prompt, response, not_trained, trained_end)
        got = sample["prompt_ids"] + sample[f"{side}_response_ids"]
        assert got == want, (hf.decode(got), hf.decode(want))
        trained = [t for t in sample[f"{side}_labels"] if t != IGNORE_INDEX]
        assert hf.decode(trained) == trained_text(name, response), hf.decode(trained)
    generation = hf.apply_chat_template(prompt, tools=TOOLS, add_generation_prompt=True, tokenize=True, **kwargs)
    generation = list(generation["input_ids"] if hasattr(generation, "keys") else generation)
    assert sample["prompt_ids"] == generation


def test_llama3_structured_results_and_string_arguments():
    """A structured tool result is written as JSON, a string one quoted (the template's tojson); arguments given as
    a JSON string (OpenAI's form) are parsed to the object the templates write."""
    ours, hf, kwargs, not_trained, trained_end = family("llama3_1+")
    prompt = [USER, calling({"type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris"}'}})]  # fmt: skip
    for result in ({"sky": "sunny", "celsius": 21}, "sunny"):
        row = {"prompt": [*prompt, {"role": "tool", "content": result}], "tools": TOOLS,
               "chosen": [{"role": "assistant", "content": "Sunny."}],
               "rejected": [{"role": "assistant", "content": "Rain."}]}  # fmt: skip
        sample = tokenize_rows([row], ours, source="rows", max_length=4096)[0]
        reference = [*prompt[:1], calling(call("get_weather", city="Paris")), {"role": "tool", "content": result}]
        want = expected_sequence("llama3_1+", hf, kwargs, reference, row["chosen"], not_trained, trained_end)
        assert sample["prompt_ids"] + sample["chosen_response_ids"] == want
        assert json.dumps(result) in hf.decode(sample["prompt_ids"])


def test_qwen2_5_response_starting_with_blank_lines_is_one_piece():
    """The template tokenizes `assistant\\n` + `\\n\\nSoft` as ['assistant', '\\n\\n\\n', 'Soft']: so do we (the merged
    token trains); the other response keeps the header's '\\n' untrained, and the prompt is what both share."""
    ours, hf, kwargs, not_trained, _ = family("qwen2_5")
    prompt = [{"role": "user", "content": "Write."}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "\n\nSoft words."}],
           "rejected": [{"role": "assistant", "content": "No."}]}  # fmt: skip
    sample = tokenize_rows([row], ours, source="rows", max_length=4096)[0]
    for side in ("chosen", "rejected"):
        text = hf.apply_chat_template(prompt + row[side], tokenize=False)
        want = hf.encode(text, add_special_tokens=False)[: -len(hf.encode(not_trained, add_special_tokens=False))]
        assert sample["prompt_ids"] + sample[f"{side}_response_ids"] == want
    assert hf.convert_ids_to_tokens(sample["chosen_response_ids"][:1]) == ["ĊĊĊ"]
    assert sample["rejected_labels"][0] == IGNORE_INDEX  # the header's newline, not trained
    assert hf.decode([t for t in sample["chosen_labels"] if t != IGNORE_INDEX]) == "\n\n\nSoft words.<|im_end|>"


BAD = {
    "undefined tool": ({"chosen": [calling(call("get_stock", symbol="X"))]}, "calls tool 'get_stock', which"),
    "arguments not JSON": ({"chosen": [calling({"function": {"name": "get_weather", "arguments": "{city: Paris"}})]},
                           "arguments are not JSON"),  # fmt: skip
    "result with no call": ({"prompt": [USER, RESULT]}, "tool result with no tool call before it"),
    "tools not a list": ({"tools": {"name": "get_weather"}}, "'tools' must be a list"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_tool_rows_are_named_and_the_rest_trains(case, tmp_path):
    ours = family("qwen2_5")[0]
    good = {"prompt": [USER], "chosen": CHOSEN, "rejected": REJECTED, "tools": TOOLS}
    change, message = BAD[case]
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, {**good, **change}, good)))
    from dpo_components.data import preference_dataset

    with pytest.raises(PreferenceDataError, match=rf"tools.jsonl.*row 1 \(line 2\): .*{message}"):
        preference_dataset(ours, source="json", data_files=str(path), max_length=4096)
    data = preference_dataset(ours, source="json", data_files=str(path), max_length=4096, on_bad_row="skip")
    assert len(data) == 2 and data.report.rows_read == 3 and sum(data.report.skipped.values()) == 1


def test_a_family_without_tool_support_refuses_tool_rows():
    ours = family("llama3")[0]  # Llama 3.0's template has no tools
    row = {"prompt": [USER], "chosen": CHOSEN, "rejected": REJECTED, "tools": TOOLS}
    with pytest.raises(PreferenceDataError, match="rows row 0: .*Llama3Tokenizer's chat format has no tool support"):
        tokenize_rows([row], ours, source="rows", max_length=4096)


def test_train_turns_of_two_whole_transcripts(tokenizer):
    """implicit rows (two whole conversations): `final` trains the last assistant turn after the shared prefix, the
    earlier ones being context; `all` trains every assistant turn after it. User turns never train."""
    shared = [{"role": "user", "content": "the plot"}]
    row = {"chosen": shared + [{"role": "assistant", "content": "was great ."}, {"role": "user", "content": "and ?"},
                               {"role": "assistant", "content": "moving ."}],
           "rejected": shared + [{"role": "assistant", "content": "was dull ."}, {"role": "user", "content": "and ?"},
                                 {"role": "assistant", "content": "weak ."}]}  # fmt: skip

    def trained(train_turns):
        sample = tokenize_rows([row], tokenizer, source="rows", max_length=256, train_turns=train_turns)[0]
        return [tokenizer.decode([t for t in sample[f"{side}_labels"] if t != IGNORE_INDEX])
                for side in ("chosen", "rejected")]  # fmt: skip

    assert trained("final") == ["moving .", "weak ."]
    assert trained("all") == ["was great .moving .", "was dull .weak ."]
    with pytest.raises(ValueError, match="train_turns must be 'final' or 'all'"):
        trained("last")


def test_prompt_and_unpaired_rows_with_tools(tmp_path):
    """Online DPO's prompts render the tools into the generation prompt, as the template's; KTO's unpaired rows
    train the completion's assistant turns only."""
    from dpo_components.data import unpaired_dataset
    from dpo_components.online.prompts import prompt_dataset

    ours, hf, kwargs, _, _ = family("qwen2_5")
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": [USER], "tools": TOOLS, "completion": CHOSEN, "label": True}) + "\n"
                    + json.dumps({"prompt": [USER], "tools": TOOLS, "completion": REJECTED, "label": False}) + "\n")
    prompts = prompt_dataset(ours, source="json", data_files=str(path))
    generation = hf.apply_chat_template([USER], tools=TOOLS, add_generation_prompt=True, tokenize=True)
    assert prompts[0]["prompt_ids"] == list(generation["input_ids"] if hasattr(generation, "keys") else generation)
    rows = unpaired_dataset(ours, source="json", data_files=str(path), max_length=4096)
    trained = hf.decode([t for t in rows[0]["chosen_labels"] if t != IGNORE_INDEX])
    assert trained == trained_text("qwen2_5", CHOSEN) and "sunny, 21 C" not in trained


@pytest.fixture(scope="module")
def tool_task(tmp_path_factory):
    """The tiny tool-use task as its config's prepare step builds it (tokenizer, untrained model, data)."""
    from dpo_components.tiny.tool_task import prepare_tool_task

    return prepare_tool_task(tmp_path_factory.mktemp("tool_task"), seed=1, train_pairs=300, eval_pairs=60)


def test_the_tool_task_holds_out_whole_cities_and_chosen_calls_the_tool_the_question_asks_for(tool_task):
    from dpo_components.tiny.tool_task import QUESTIONS, prepare_tool_task

    manifest = json.loads((tool_task / "manifest.json").read_text())
    split = {name: [json.loads(line) for line in (tool_task / f"data/{name}.jsonl").read_text().splitlines()]
             for name in ("train", "eval")}  # fmt: skip
    assert (len(split["train"]), len(split["eval"])) == (300, 60)
    city = lambda side: side[0]["tool_calls"][0]["function"]["arguments"]["city"]
    tool = lambda side: side[0]["tool_calls"][0]["function"]["name"]
    for name, rows in split.items():
        for row in rows:
            held = city(row["chosen"]) in manifest["heldout_cities"]
            assert held == (name == "eval") and city(row["chosen"]) == city(row["rejected"])
            question = row["prompt"][0]["content"]
            assert any(q.format(city=city(row["chosen"])) == question for q in QUESTIONS[tool(row["chosen"])])
            assert tool(row["rejected"]) != tool(row["chosen"])
    assert len(manifest["heldout_cities"]) == 3
    written = (tool_task / "data/train.jsonl").stat().st_mtime_ns
    assert prepare_tool_task(tool_task, seed=1, train_pairs=300, eval_pairs=60) == tool_task
    assert (tool_task / "data/train.jsonl").stat().st_mtime_ns == written  # reused, not rebuilt
    (tool_task / "data/eval.jsonl").unlink()  # a file gone: built again, the same
    prepare_tool_task(tool_task, seed=1, train_pairs=300, eval_pairs=60)
    assert [json.loads(line) for line in (tool_task / "data/eval.jsonl").read_text().splitlines()] == split["eval"]


def test_the_tool_use_config_prepares_its_task_and_trains(tmp_path):
    """recipe_configs/tiny/full_dpo_tool_use.yaml as shipped (sizes shrunk): its prepare step builds the task, the
    FSDP2 recipe trains on the tool rows, and the data report counts only calls and answers as trained."""
    from conftest import recipe_config, run_distributed_in_process

    from recipes.full_dpo_distributed import FullDPORecipeDistributed

    out = tmp_path / "run"
    cfg = recipe_config("recipe_configs/tiny/full_dpo_tool_use.yaml", [
        f"prepare.out_dir={tmp_path / 'task'}", "prepare.train_pairs=8", "prepare.eval_pairs=4", "batch_size=4",
        "epochs=1", "max_steps_per_epoch=2", "eval_every_n_steps=null", "save_every_n_steps=null",
        f"output_dir={out}"])  # fmt: skip
    run_distributed_in_process(FullDPORecipeDistributed, cfg, tmp_path / "pg")
    assert (tmp_path / "task/manifest.json").exists() and (out / "step_2/model-00001-of-00001.safetensors").exists()
    report = json.loads((out / "data_report.json").read_text())
    trained = report["dataset"]["trained_tokens"]["chosen"]
    assert report["dataset"]["rows_kept"] == 8
    assert 20 <= trained["p50"] and trained["max"] <= 30  # the call and the answer; with the result and headers ~50


def test_tool_results_carry_no_loss(tool_task):
    """On the tiny tool-use task's rows (dpo_components.tiny.tool_task) and the tiny model, the log-probs the losses
    use have zero gradient with respect to the last layer's output at every position that predicts a tool result
    (or a header), and a non-zero one at every position that predicts a token of the call or the answer."""
    from dpo_components.data import collate_preference_batch
    from dpo_components.logprobs import concatenated_logprobs
    from dpo_components.tiny.model import tiny_llama
    from dpo_components.tiny.tool_task import MAX_LENGTH, tool_task_tokenizer

    tokenizer = tool_task_tokenizer(tool_task / "tokenizer")
    rows = [json.loads(line) for line in (tool_task / "data/train.jsonl").read_text().splitlines()[:2]]
    data = tokenize_rows(rows, tokenizer, source="rows", max_length=MAX_LENGTH)
    batch = collate_preference_batch([data[0], data[1]], padding_idx=tokenizer.pad_id)
    model = tiny_llama().eval()
    shift = torch.zeros(*batch["input_ids"].shape, model.norm.scale.shape[0], requires_grad=True)
    model.layers[-1].register_forward_hook(lambda module, args, out: out + shift)  # the last layer's output
    logps = concatenated_logprobs(model, batch)
    (logps.chosen_logps.sum() + logps.rejected_logps.sum()).backward()
    moved = shift.grad[:, :-1].abs().sum(-1) > 0  # position t predicts token t + 1
    scored = batch["labels"][:, 1:] != IGNORE_INDEX
    assert torch.equal(moved, scored)
    for i, sample_row in enumerate(rows * 2):
        side = "chosen" if i < len(rows) else "rejected"
        result = sample_row[side][1]["content"]
        unscored = tokenizer.decode(batch["input_ids"][i, 1:][~scored[i]].tolist())  # the result is written quoted
        trained = tokenizer.decode(batch["input_ids"][i, 1:][scored[i]].tolist())
        assert json.dumps(result) in unscored and json.dumps(result) not in trained


TRANSCRIPTS = {  # two whole conversations (implicit format) that share their first turns
    "diverge at the call": ([USER, *CHOSEN], [USER, *REJECTED]),
    "diverge at the result": ([USER, CHOSEN[0], RESULT, CHOSEN[2]],
                              [USER, CHOSEN[0], {"role": "tool", "content": "rain"},
                               {"role": "assistant", "content": "It rains."}]),  # fmt: skip
    "diverge at a user turn": ([USER, *CHOSEN, {"role": "user", "content": "And Rome?"},
                                {"role": "assistant", "content": "Rain."}],
                               [USER, *CHOSEN, {"role": "user", "content": "And Oslo?"},
                                {"role": "assistant", "content": "Snow."}]),  # fmt: skip
}


@pytest.mark.parametrize("case", TRANSCRIPTS)
def test_two_transcripts_train_their_final_turn_as_the_template_writes_them(tokenizers, case):
    """implicit rows that diverge before their final turn (at a call, at a tool result, at a user turn): the
    whole sequence is the template's conversation, and only each side's final assistant turn trains."""
    name, ours, hf, kwargs, not_trained, trained_end = tokenizers
    chosen, rejected = TRANSCRIPTS[case]
    sample = tokenize_rows([{"chosen": chosen, "rejected": rejected, "tools": TOOLS}], ours, source="rows",
                           max_length=4096)[0]  # fmt: skip
    for side, conversation in (("chosen", chosen), ("rejected", rejected)):
        ids = hf.encode(hf.apply_chat_template(conversation, tools=TOOLS, tokenize=False, **kwargs),
                        add_special_tokens=False)  # fmt: skip
        tail = hf.encode(not_trained, add_special_tokens=False) if not_trained else []
        want = ids[: len(ids) - len(tail)] + (hf.encode(trained_end, add_special_tokens=False) if trained_end else [])
        assert sample["prompt_ids"] + sample[f"{side}_response_ids"] == want
        trained = hf.decode([t for t in sample[f"{side}_labels"] if t != IGNORE_INDEX])
        think = EMPTY_THINK if name == "qwen3-thinking" else ""
        end = "<|eot_id|>" if name == "llama3_1+" else "<|im_end|>"
        assert trained == think + conversation[-1]["content"] + end


def test_a_completion_that_opens_with_a_tool_result(tmp_path):
    """KTO: a completion [result, answer] after a prompt ending in a call trains the answer only."""
    from dpo_components.data import unpaired_dataset

    ours, hf, *_ = family("llama3_1+")
    rows = [{"prompt": [USER, CHOSEN[0]], "tools": TOOLS, "completion": CHOSEN[1:], "label": True},
            {"prompt": [USER, CHOSEN[0]], "tools": TOOLS, "completion": [{"role": "tool", "content": "rain"},
             {"role": "assistant", "content": "It rains."}], "label": False}]  # fmt: skip
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = unpaired_dataset(ours, source="json", data_files=str(path), max_length=4096)
    assert [hf.decode([t for t in data[i]["chosen_labels"] if t != IGNORE_INDEX]) for i in range(2)] == [
        "It is sunny.<|eot_id|>", "It rains.<|eot_id|>"]


def test_a_cut_agentic_prompt_keeps_its_user_turn_first():
    """max_prompt_length on [long user turn, call, result]: no whole turn can go (the result would be left without
    its call), so the user's text is cut at its start and the prompt stays valid, a prefix of the template's."""
    ours, hf, kwargs, *_ = family("qwen2_5")
    long_user = {"role": "user", "content": "Tell me everything. " * 40 + "What is the weather in Paris?"}
    prompt = [long_user, CHOSEN[0], RESULT]
    row = {"prompt": prompt, "tools": TOOLS, "chosen": [CHOSEN[2]], "rejected": [REJECTED[2]]}
    full = tokenize_rows([row], ours, source="rows", max_length=4096)[0]
    sample = tokenize_rows([row], ours, source="rows", max_length=len(full["prompt_ids"]) - 20,
                           max_prompt_length=len(full["prompt_ids"]) - 40)[0]  # fmt: skip
    text = hf.decode(sample["prompt_ids"])
    assert "<tool_call>" in text and "<tool_response>" in text and "What is the weather in Paris?" in text
    assert text.count("Tell me everything.") < 40


@pytest.mark.parametrize("name", ("qwen2_5", "qwen3"))
def test_an_empty_system_turn_with_tools(name):
    ours, hf, kwargs, *_ = family(name)
    prompt = [{"role": "system", "content": ""}, USER]
    row = {"prompt": prompt, "tools": TOOLS, "chosen": CHOSEN, "rejected": REJECTED}
    sample = tokenize_rows([row], ours, source="rows", max_length=4096)[0]
    generation = hf.apply_chat_template(prompt, tools=TOOLS, add_generation_prompt=True, tokenize=True, **kwargs)
    assert sample["prompt_ids"] == list(generation["input_ids"] if hasattr(generation, "keys") else generation)
