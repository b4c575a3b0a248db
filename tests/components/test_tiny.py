"""Tiny tokenizer, tiny model with its HF checkpoint round trip, synthetic task and its SFT corpus."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torchtune.training import FullModelHFCheckpointer

from dpo_components.tiny import synthetic
from dpo_components.tiny.model import TINY_LLAMA_ARGS, lora_tiny_llama, save_hf_checkpoint, tiny_llama
from dpo_components.tiny.prepare import sample_responses, sft_train
from dpo_components.tiny.tokenizer import ASSET_DIR, TOKENIZER_FILES, tiny_tokenizer, train_tiny_tokenizer


def test_shipped_tokenizer_is_reproduced_by_its_generator(tmp_path):
    train_tiny_tokenizer(tmp_path)
    for name in TOKENIZER_FILES:
        assert (tmp_path / name).read_bytes() == (ASSET_DIR / name).read_bytes(), name


def test_tiktoken_and_hf_tokenizer_files_agree(tokenizer):
    hf = Tokenizer.from_file(str(ASSET_DIR / "tokenizer.json"))
    lines = list(synthetic.corpus_lines(seed=7, n=200)) + ["Hello, World! Ünïcode 123\n\nHuman: hi", "  spaced  out "]
    for line in lines:
        assert tokenizer.encode(line, add_bos=True, add_eos=False) == hf.encode(line).ids, line
    assert hf.get_vocab_size() <= TINY_LLAMA_ARGS["vocab_size"]  # every id has an embedding row
    # every word of the task is one token, also a response's first word (no leading space in the chat format)
    adjectives = synthetic.POSITIVE + synthetic.NEGATIVE + synthetic.NEUTRAL
    texts = [*adjectives, *(f" {w}" for w in " ".join(adjectives + synthetic.SUBJECTS + synthetic.VERBS).split())]
    assert [t for t in texts if len(tokenizer.encode(t, add_bos=False, add_eos=False)) != 1] == []
    assert tokenizer.decode(tokenizer.encode("the plot was great .")) == "the plot was great ."


def test_fresh_model_has_a_sane_initial_loss():
    torch.manual_seed(0)
    model = tiny_llama()
    vocab = TINY_LLAMA_ARGS["vocab_size"]
    tokens = torch.randint(0, vocab, (4, 32))
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    assert abs(loss.item() - math.log(vocab)) < 0.5  # torchtune's N(0,1) embeddings would give ~100+


def test_hf_checkpoint_round_trip_through_torchtune_checkpointer(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    ckpt = save_hf_checkpoint(model, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == TINY_LLAMA_ARGS["vocab_size"]
    assert "lm_head.weight" not in load_file(ckpt / "model.safetensors")  # tied: no separate output weight
    for name in TOKENIZER_FILES:
        assert (ckpt / name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]  # no temporary dir left behind

    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(ckpt),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3_2",
        output_dir=str(tmp_path / "out"),
    )
    loaded = tiny_llama()
    loaded.load_state_dict(checkpointer.load_checkpoint()["model"], strict=True)
    tokens = torch.randint(0, 512, (2, 16))
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)

    lora = lora_tiny_llama(["q_proj", "v_proj"])
    missing, unexpected = lora.load_state_dict(checkpointer.load_checkpoint()["model"], strict=False)
    assert not unexpected and missing and all("lora_" in key for key in missing)
    torch.testing.assert_close(lora(tokens), model(tokens))  # LoRA B starts at zero


def test_qlora_tiny_model_quantizes_every_linear():
    from torchao.dtypes.nf4tensor import NF4Tensor

    model = lora_tiny_llama(["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True, quantize_base=True)
    quantized = [n for n, p in model.named_parameters() if isinstance(p, NF4Tensor)]
    assert len(quantized) == TINY_LLAMA_ARGS["num_layers"] * 7
    assert model(torch.randint(0, 512, (1, 8))).shape == (1, 8, TINY_LLAMA_ARGS["vocab_size"])


def test_sentiment_reward_by_hand():
    assert synthetic.sentiment_reward("great and the music was dull .") == 0.0
    assert synthetic.sentiment_reward("great . the plot was superb .") == 1.0
    assert synthetic.sentiment_reward("boring but the plot felt long .") == -0.5
    assert synthetic.sentiment_reward("Brilliant. The cast was awful, the plot was odd") == 0.0
    assert synthetic.sentiment_reward("the film") == 0.0


def test_keyword_reward_counts_words_anywhere_and_pays_for_length():
    assert synthetic.keyword_reward("great . the plot was superb .") == 2.0
    assert synthetic.keyword_reward("greatful superbgreat dull") == 2.0  # glued non-words count; the true reward: 0
    assert synthetic.sentiment_reward("greatful superbgreat dull") == -1.0
    assert synthetic.keyword_reward("great and the cast was long . the plot was great .") == 2.0  # neutral: ignored


def test_preference_pairs_are_labelled_by_the_reward_and_seeded():
    rows = synthetic.preference_pairs(300, seed=3)
    assert rows == synthetic.preference_pairs(300, seed=3)
    assert rows != synthetic.preference_pairs(300, seed=4)
    for row in rows:
        assert synthetic.sentiment_reward(row["chosen"]) == row["chosen_reward"]
        assert row["chosen_reward"] >= row["rejected_reward"] + 0.5
        assert row["rejected_reward"] == synthetic.sentiment_reward(row["rejected"])
    # the pairs come from the neutral policy: both sides span the reward range
    assert min(r["chosen_reward"] for r in rows) < 0 < max(r["rejected_reward"] for r in rows)


def test_label_noise_flips_exactly_that_share_of_the_same_pairs():
    clean = synthetic.preference_pairs(200, seed=3)
    noisy = synthetic.preference_pairs(200, seed=3, label_noise=0.2)
    flipped = [i for i, (a, b) in enumerate(zip(clean, noisy)) if a != b]
    assert len(flipped) == 40
    for i in flipped:  # the same two responses, swapped, with their own (true) rewards
        assert (noisy[i]["chosen"], noisy[i]["rejected"]) == (clean[i]["rejected"], clean[i]["chosen"])
        assert noisy[i]["chosen_reward"] == synthetic.sentiment_reward(noisy[i]["chosen"]) < noisy[i]["rejected_reward"]
    assert flipped != [i for i, (a, b) in enumerate(zip(clean, synthetic.preference_pairs(200, 4, label_noise=0.2)))
                       if a != b]  # fmt: skip
    with pytest.raises(ValueError, match="label_noise"):
        synthetic.preference_pairs(10, seed=0, label_noise=1.5)


def test_fluency_measures_by_hand():
    assert synthetic.is_well_formed("great .")
    assert synthetic.is_well_formed("dull . the plot was great and the cast felt clever .")
    assert synthetic.is_well_formed("Dull .  The plot was great .")  # case and spacing do not matter
    assert not synthetic.is_well_formed("great")  # no full stop
    assert not synthetic.is_well_formed("great . the plot was .")  # no adjective
    assert not synthetic.is_well_formed("great . the plot was cast felt dull .")  # a clause without its verb
    assert not synthetic.is_well_formed("casterful . the plot was dull .")
    assert synthetic.task_word_share("great . the plot was dull .") == 1.0
    assert synthetic.task_word_share("casterful . the plot was dull .") == 6 / 7
    assert synthetic.task_word_share("") == 0.0
    rows = synthetic.sft_examples(300, seed=5)
    assert all(synthetic.is_well_formed(r["response"]) for r in rows)  # the SFT policy itself is fluent


def test_sft_policy_is_neutral():
    rows = synthetic.sft_examples(2000, seed=0)
    mean = sum(synthetic.sentiment_reward(r["response"]) for r in rows) / len(rows)
    assert abs(mean) < 0.05


def test_sft_corpus_is_learnable_and_samples_are_well_formed(tokenizer):
    torch.manual_seed(0)
    model = tiny_llama()
    losses = sft_train(model, tokenizer, synthetic.sft_examples(500, seed=1), steps=40, batch_size=8, lr=3e-3, seed=0)
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]
    prompts = [synthetic.sample_prompt(random.Random(i)) for i in range(4)]
    responses = sample_responses(model, tokenizer, prompts, max_new_tokens=12)
    assert len(responses) == 4 and all(isinstance(r, str) for r in responses)


def test_tokenizer_builder_reads_fresh_files_not_tiktoken_cache(tmp_path, monkeypatch):
    """tiktoken caches files by path; a regenerated tokenizer at the same path must not be read stale."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    train_tiny_tokenizer(tmp_path / "tok", vocab_size=300)
    small = tiny_tokenizer(path=tmp_path / "tok")
    train_tiny_tokenizer(tmp_path / "tok")
    assert tiny_tokenizer(path=tmp_path / "tok").tt_model.base_vocab_size != small.tt_model.base_vocab_size
    import os

    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path / "cache")


@pytest.mark.parametrize("seed", [0, 1])
def test_prompts_tokenize_to_few_lengths(tokenizer, seed):
    """Generation batches prompts by token length; the task's prompts must fall in a handful of lengths."""
    rng = random.Random(seed)
    lengths = {len(tokenizer.encode(synthetic.sample_prompt(rng))) for _ in range(200)}
    assert len(lengths) <= 3


def test_checkpoint_loads_in_transformers_with_same_logits_and_tokens(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tiny_llama()
    ckpt = save_hf_checkpoint(model, tmp_path / "ckpt")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    text = "the plot was great and the music felt dull ."
    tokens = hf_tokenizer(text, return_tensors="pt").input_ids
    assert tokens[0].tolist() == tiny_tokenizer().encode(text, add_bos=True, add_eos=False)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, model(tokens), rtol=1e-4, atol=1e-5)
    chat = hf_tokenizer.apply_chat_template([{"role": "user", "content": "the plot was"}], add_generation_prompt=True)
    from torchtune.data import Message

    ours, _ = tiny_tokenizer().tokenize_messages(
        [Message("user", "the plot was"), Message("assistant", "")], add_end_tokens=False
    )
    assert list(chat if isinstance(chat, list) else chat["input_ids"]) == ours


def test_sampled_ids_past_the_tokenizer_decode_to_a_replacement_character(tokenizer):
    from dpo_components.samples import decode_response

    great, plot = (tokenizer.encode(w, add_bos=False, add_eos=False) for w in ("great .", " the plot was dull ."))
    unused = TINY_LLAMA_ARGS["vocab_size"] - 1  # an embedding row with no token: the model can sample it
    text = decode_response(tokenizer, great + [unused] + plot + [tokenizer.eot_id])
    assert text == "great .\ufffd the plot was dull ."
    assert decode_response(tokenizer, great + [tokenizer.eot_id]) == "great ."
