"""Every torchtune 0.6.1 tokenizer family builds preference pairs, each with its own tokenizer class and chat format
(loaded from tiny files the project trains: dpo_components.tiny.family_tokenizers). Before, every family but Llama
crashed in the data builder (`add_end_tokens` is Llama's name for the switch the others call `add_eos`)."""

import pytest
from torchtune.data import Message

from dpo_components.data import (
    PreferenceDataError,
    decode_text,
    generation_prompt,
    stop_tokens,
    tokenize_chat,
    tokenize_rows,
)
from dpo_components.logprobs import IGNORE_INDEX
from dpo_components.tiny.family_tokenizers import FAMILIES, family_tokenizer, write_family_tokenizer
from dpo_components.tiny.tokenizer import tiny_tokenizer

CHOSEN, REJECTED = "the film was great !", "the film was bad ."
EARLIER = [{"role": "user", "content": "Write a review."}, {"role": "assistant", "content": "the film ."}]


# The tokenizer each family's configs ship, and torchtune's own classes where ours replace them (their formats differ
# from the released templates: dpo_components.models.chat_formats); the data builder must work with both.
TORCHTUNE_VARIANTS = tuple(f"{name}:torchtune" for name in ("mistral", "qwen2_5", "phi4"))


@pytest.fixture(scope="module", params=("llama3", *FAMILIES, *TORCHTUNE_VARIANTS))
def family(request, tmp_path_factory):
    param = request.param
    if param == "llama3":
        return param, tiny_tokenizer()
    name = param.split(":")[0]
    files = write_family_tokenizer(tmp_path_factory.mktemp(name), name)
    return param, family_tokenizer(files, name, torchtune_class=param.endswith(":torchtune"))


def pair(prompt_turns):
    return {"prompt": prompt_turns, "chosen": [{"role": "assistant", "content": CHOSEN}],
            "rejected": [{"role": "assistant", "content": REJECTED}]}  # fmt: skip


def text_of(tokenizer, ids):
    """Decoded text (``data.decode_text`` also reads torchtune 0.6.1's Phi-4 list of byte-level pieces)."""
    return decode_text(tokenizer, ids).strip()


def end_of_response(name, tokenizer):
    """The token a trained response ends with: the family's end of turn (Qwen2.5 and Phi-4 use <|im_end|> as EOS)."""
    return tokenizer.eot_id if name == "llama3" else tokenizer.eos_id


@pytest.mark.parametrize("turns", [1, 3], ids=["single-turn", "multi-turn"])
def test_pairs_mask_the_prompt_and_train_the_response_and_its_end(family, turns):
    name, tokenizer = family
    prompt = [*EARLIER, {"role": "user", "content": "More ?"}][-turns:]
    sample = tokenize_rows([pair(prompt)], tokenizer, source="rows", max_length=256)[0]
    messages = [Message(m["role"], m["content"], masked=True) for m in prompt]

    # the prompt is the generation prompt (chat format + assistant header), not trained
    assert sample["prompt_ids"] == generation_prompt(tokenizer, messages)
    for side, text in (("chosen", CHOSEN), ("rejected", REJECTED)):
        response, labels = sample[f"{side}_response_ids"], sample[f"{side}_labels"]
        full, _ = tokenize_chat(tokenizer, [*messages, Message("assistant", text)])
        assert sample["prompt_ids"] + response == full  # prompt + response is exactly the chat format
        trained = [t for t in labels if t != IGNORE_INDEX]
        assert trained[-1] == end_of_response(name, tokenizer)  # the end of turn is learned ...
        assert trained[-1] in stop_tokens(tokenizer)  # ... and ends sampling
        words = [t for t in trained if t not in stop_tokens(tokenizer)]
        assert text_of(tokenizer, words) == text  # the whole response text is trained
    bos = getattr(tokenizer, "bos_id", None)
    sequence = sample["prompt_ids"] + sample["chosen_response_ids"]
    if name in ("llama2", "phi3", "mistral:torchtune") and turns > 1:  # torchtune opens every exchange with <s>
        assert sequence.count(bos) == 2 and sequence[0] == bos
    elif name.split(":")[0] in ("qwen2", "qwen2_5", "qwen3", "phi4"):  # ChatML formats have no BOS
        assert bos not in sequence
    else:
        assert sequence.count(bos) == 1 and sequence[0] == bos


def test_a_system_turn_the_format_lacks_is_a_named_bad_row(family):
    name, tokenizer = family
    rows = [pair([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a review."}])]
    refused = {
        "mistral:torchtune": "MistralTokenizer cannot format these messages: System prompts are not supported",
        "gemma": "Gemma2Tokenizer cannot format these messages: Gemma's chat format has no system role",
    }
    if name not in refused:
        with_system = tokenize_rows(rows, tokenizer, source="rows", max_length=256)[0]
        without = tokenize_rows([pair(rows[0]["prompt"][1:])], tokenizer, source="rows", max_length=256)[0]
        assert with_system["prompt_ids"] != without["prompt_ids"]  # the system turn is in the prompt
        assert with_system["chosen_response_ids"] == without["chosen_response_ids"]
        return
    with pytest.raises(PreferenceDataError, match=f"rows row 0: {refused[name]}"):
        tokenize_rows(rows, tokenizer, source="rows", max_length=256)


def test_qwen3_turns_are_non_thinking(tmp_path):
    """Qwen3's template with enable_thinking=False: the prompt ends with an empty <think> block (masked, so generation
    starts after it), <think> blocks of earlier assistant turns are dropped, a response holding one is a bad row."""
    tokenizer = family_tokenizer(write_family_tokenizer(tmp_path, "qwen3"), "qwen3")
    think, end_think = tokenizer.special_tokens["<think>"], tokenizer.special_tokens["</think>"]
    history = [{"role": "user", "content": "Write a review."},
               {"role": "assistant", "content": "<think>\nthe user wants one\n</think>\n\nthe film ."},
               {"role": "user", "content": "More ?"}]  # fmt: skip
    sample = tokenize_rows([pair(history)], tokenizer, source="rows", max_length=256)[0]
    prompt = sample["prompt_ids"]
    empty_think = tokenizer.encode("<think>\n\n</think>\n\n", add_bos=False, add_eos=False)
    assert prompt[-len(empty_think) :] == empty_think and prompt.count(think) == 1  # earlier block dropped
    assert "the user wants one" not in text_of(tokenizer, prompt)
    assert think not in sample["chosen_response_ids"] and end_think not in sample["chosen_response_ids"]
    assert text_of(tokenizer, sample["chosen_response_ids"][:-1]) == CHOSEN

    thinking = [{"role": "assistant", "content": "<think>x</think>ok"}]
    rows = [pair(history[:1]), {**pair(history[:1]), "chosen": thinking}]
    with pytest.raises(PreferenceDataError, match="rows row 1: Qwen3Tokenizer cannot format these messages: a response "
                                                  "with a <think> block"):  # fmt: skip
        tokenize_rows(rows, tokenizer, source="rows", max_length=256)


class HomeMadeTokenizer:
    def tokenize_messages(self, messages):  # no end-of-sequence switch: the builder cannot control the end
        return [1, 2], [True, False]


def test_a_tokenizer_the_builder_does_not_know_is_named():
    from transformers import AutoTokenizer

    from dpo_components.tiny.tokenizer import ASSET_DIR

    hf_tokenizer = AutoTokenizer.from_pretrained(ASSET_DIR)  # has no tokenize_messages at all
    for tokenizer, name in ((HomeMadeTokenizer(), "test_families.HomeMadeTokenizer"),
                            (hf_tokenizer, f"transformers[.a-z_]*.{type(hf_tokenizer).__name__}")):  # fmt: skip
        with pytest.raises(TypeError, match=f"does not know tokenizer .*{name}: it needs a torchtune ModelTokenizer"):
            tokenize_rows([pair([{"role": "user", "content": "Write a review."}])], tokenizer, source="rows")


def test_the_mistral_v0_3_format_refuses_a_tokenizer_without_its_control_tokens(tmp_path):
    from dpo_components.models.chat_formats import mistral_v0_3_tokenizer

    files = write_family_tokenizer(tmp_path, "llama2")  # a SentencePiece model with no [INST] piece (as v0.1's)
    with pytest.raises(ValueError, match="tokenizer.model has no \\[INST\\]/\\[/INST\\] pieces: not a Mistral v0.3"):
        mistral_v0_3_tokenizer(str(files / "tokenizer.model"))
