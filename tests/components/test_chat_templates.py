"""Our data builder gives, token for token, what Hugging Face's `apply_chat_template` gives for the same messages
(the released models' templates, dpo_components.tiny.hf_tokenizers) with a tokenizer.json / tokenizer.model from the
same tiny vocabulary: the prompt is the template's generation prompt, and prompt + response is the template's
conversation up to the family's end of turn, then the family's trained end."""

import pytest
from transformers import AutoTokenizer

from dpo_components.data import PreferenceDataError, tokenize_rows
from dpo_components.tiny.family_tokenizers import family_tokenizer, write_family_tokenizer
from dpo_components.tiny.hf_tokenizers import HF_FAMILIES, write_hf_tokenizer
from dpo_components.tiny.tokenizer import ASSET_DIR, tiny_tokenizer

RESPONSE = "the film was great (really) !"
PROMPTS = {
    "single-turn": [{"role": "user", "content": "Write a review."}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a review."}],
    "multi-turn": [{"role": "user", "content": "Write a review."}, {"role": "assistant", "content": "the film ."},
                   {"role": "user", "content": "More ? 2024"}],
}  # fmt: skip
# After the end-of-turn token: what the template writes that is not trained, and what we train that it does not
# write (the EOS torchtune appends; TRL appends one too).
TAILS = {"qwen2_5": (["\n"], []), "qwen3": (["\n"], []), "phi4": ([], []), "gemma": ([], ["<eos>"]),
         "mistral": ([], []), "llama3": ([], ["<|end_of_text|>"])}  # fmt: skip
TEMPLATE_ARGS = {"qwen3": {"enable_thinking": False}}


@pytest.fixture(scope="module", params=(*HF_FAMILIES, "llama3"))
def tokenizers(request, tmp_path_factory):
    name = request.param
    if name == "llama3":
        return name, tiny_tokenizer(), AutoTokenizer.from_pretrained(ASSET_DIR)
    files = write_hf_tokenizer(write_family_tokenizer(tmp_path_factory.mktemp(name), name), name)
    return name, family_tokenizer(files, name), AutoTokenizer.from_pretrained(files)


def template_ids(hf, messages, name, **kwargs):
    ids = hf.apply_chat_template(messages, **TEMPLATE_ARGS.get(name, {}), **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def ids_of(hf, tokens):
    return [i for token in tokens for i in hf.encode(token, add_special_tokens=False)]


@pytest.mark.parametrize("case", PROMPTS)
def test_pairs_are_the_chat_template_token_for_token(tokenizers, case):
    name, ours, hf = tokenizers
    prompt, response = PROMPTS[case], [{"role": "assistant", "content": RESPONSE}]
    row = {"prompt": prompt, "chosen": response, "rejected": [{"role": "assistant", "content": "bad ."}]}
    try:
        expected_prompt = template_ids(hf, prompt, name, add_generation_prompt=True)
    except Exception as refusal:  # Gemma: no system role. Ours refuses the row too, naming it
        assert name == "gemma" and "System role not supported" in str(refusal)
        with pytest.raises(PreferenceDataError, match="rows row 0: .*no system role"):
            tokenize_rows([row], ours, source="rows", max_length=256)
        return
    sample = tokenize_rows([row], ours, source="rows", max_length=256)[0]
    assert sample["prompt_ids"] == expected_prompt

    if name == "mistral" and case == "system":
        # v0.3's template writes the system message only into a *last* user turn: for the whole conversation it
        # drops it. We keep the generation prompt's (what the model sees when it generates), so compare the
        # response against the conversation without it.
        prompt = prompt[1:]
    conversation = template_ids(hf, prompt + response, name)
    response_ids = conversation[len(template_ids(hf, prompt, name, add_generation_prompt=True)) :]
    not_trained, trained_extra = (ids_of(hf, tokens) for tokens in TAILS[name])
    assert response_ids[len(response_ids) - len(not_trained) :] == not_trained
    assert sample["chosen_response_ids"] == response_ids[: len(response_ids) - len(not_trained)] + trained_extra
