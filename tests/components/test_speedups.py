"""The speed switches leave the numbers unchanged: prefix sharing, length-grouped batches, cached reference."""

from functools import partial

import pytest
import torch
from helpers import logged
from helpers import run_lora_recipe as run
from torchtune import training
from torchtune.modules import TransformerSelfAttentionLayer

from dpo_components.data import collate_preference_batch
from dpo_components.data.collate import batch_positions
from dpo_components.data.order import epoch_order, length_grouped_order
from dpo_components.data.prefix_sharing import check_fits, collate_prefix_shared
from dpo_components.data.segments import CHOSEN, PADDING, PROMPT, REJECTED
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.models.attention_masks import attention_mask
from dpo_components.tiny.model import TINY_LLAMA_ARGS, tiny_llama


def random_pairs(n=5, seed=0):
    """Pairs of different prompt and response lengths; some responses end in a masked (-100) token."""
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(0, TINY_LLAMA_ARGS["vocab_size"], (k,), generator=g).tolist()

    pairs = []
    for i in range(n):
        prompt, chosen, rejected = ids(3 + 2 * i), ids(2 + (7 * i) % 9), ids(4 + (5 * i) % 7)
        rejected_labels = rejected[:-1] + [-100] if i % 2 else list(rejected)
        pairs.append({"prompt_ids": prompt, "chosen_response_ids": chosen, "chosen_labels": list(chosen),
                      "rejected_response_ids": rejected, "rejected_labels": rejected_labels, "index": i})  # fmt: skip
    return pairs


def test_shared_row_layout_by_hand():
    pair = {"prompt_ids": [5, 6], "chosen_response_ids": [7, 8], "chosen_labels": [7, 8],
            "rejected_response_ids": [9], "rejected_labels": [9], "index": 0}  # fmt: skip
    batch = collate_prefix_shared([pair], padding_idx=0, pad_to_multiple_of=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0]]
    assert batch["input_pos"].tolist() == [[0, 1, 2, 3, 2, 0]]  # rejected restarts where chosen started
    assert batch["segments"].tolist() == [[PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED, PADDING]]
    # chosen 7 from position 1, chosen 8 from 2; rejected 9 from the last prompt token (1), not from 3
    assert batch["score_positions"].tolist() == [1, 2, 1]
    assert batch["score_targets"].tolist() == [7, 8, 9]
    assert batch["score_sequences"].tolist() == [0, 0, 1]
    assert batch["lengths"].tolist() == [4, 3]  # the standard rows' lengths: prompt + response
    assert batch_positions(batch) == (5, 6)
    mask = attention_mask(batch["segments"])[0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # the rejected token sees the prompt and itself, not the chosen response
        [0, 0, 0, 0, 0, 1],  # padding sees only padding, itself at least (never an empty row: no NaN)
    ]


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_prefix_sharing_equals_standard_layout_values_and_gradients(activation_checkpointing):
    torch.manual_seed(0)
    model = tiny_llama()
    if activation_checkpointing:  # mask and positions must pass through torchtune's checkpoint wrappers
        training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    pairs = random_pairs()

    def logps_and_grads(batch):
        model.zero_grad()
        logps = concatenated_logprobs(model, batch, chunk_size=7)
        (logps.chosen_logps.sum() - 0.5 * logps.rejected_logps.sum()).backward()
        return logps, {n: p.grad.clone() for n, p in model.named_parameters()}

    standard, standard_grads = logps_and_grads(collate_preference_batch(pairs))
    shared_batch = collate_prefix_shared(pairs, pad_to_multiple_of=8)
    shared, shared_grads = logps_and_grads(shared_batch)
    for name in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(getattr(shared, name), getattr(standard, name), rtol=1e-5, atol=1e-4)
    assert torch.equal(shared.chosen_tokens, standard.chosen_tokens)
    assert torch.equal(shared.rejected_tokens, standard.rejected_tokens)
    assert standard.rejected_tokens.tolist() != [len(p["rejected_response_ids"]) for p in pairs]  # masks counted
    for name, grad in standard_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    data, computed = batch_positions(shared_batch)
    assert data == sum(len(p["prompt_ids"]) + len(p["chosen_response_ids"]) + len(p["rejected_response_ids"])
                       for p in pairs)  # fmt: skip
    assert computed == shared_batch["input_ids"].numel()


def test_check_fits_names_the_pair():
    pairs = random_pairs(3)

    class Data(list):
        pass

    longest = max(len(p["prompt_ids"]) + len(p["chosen_response_ids"]) + len(p["rejected_response_ids"])
                  for p in pairs)  # fmt: skip
    check_fits(longest, dataset=Data(pairs), eval_dataset=None)
    with pytest.raises(ValueError, match=rf"pair \d+ of eval_dataset needs a row of {longest} tokens"):
        check_fits(longest - 1, dataset=Data(pairs[:1]), eval_dataset=Data(pairs))
    with pytest.raises(ValueError, match=r"needs a row of 64 tokens \(prompt \+ chosen \+ rejected, padded\)"):
        check_fits(longest, 64, dataset=Data(pairs))


def test_length_grouped_order_is_a_seeded_permutation_with_less_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 500, (1003,), generator=g).tolist()
    order = length_grouped_order(lengths, batch_size=8, seed=3, epoch=0, group_batches=16)
    assert sorted(order) == list(range(1003))
    assert order == length_grouped_order(lengths, batch_size=8, seed=3, epoch=0, group_batches=16)
    assert order != length_grouped_order(lengths, batch_size=8, seed=3, epoch=1, group_batches=16)

    def padding(order):
        batches = [order[i : i + 8] for i in range(0, len(order) - 7, 8)]  # drop_last
        return sum(max(lengths[j] for j in b) * 8 - sum(lengths[j] for j in b) for b in batches)

    assert padding(order) < 0.2 * padding(epoch_order(1003, seed=3, epoch=0))
    first_batches = [order[i : i + 8] for i in range(0, 80, 8)]
    assert len({max(lengths[j] for j in b) // 100 for b in first_batches}) > 1  # batches of all lengths, shuffled


@pytest.mark.recipe
def test_recipe_speedups_leave_losses_unchanged(recipe_cfg, tmp_path):
    common = {"max_steps_per_epoch": 4, "batch_size": 8, "optimizer.lr": 3e-3, "eval_dataset": None}
    base = recipe_cfg(**common, output_dir=str(tmp_path / "base"))
    fast = recipe_cfg(**common, output_dir=str(tmp_path / "fast"), prefix_sharing=True,
                      **{"reference.mode": "precomputed", "reference.cache_dir": str(tmp_path / "cache")})  # fmt: skip
    run(base)
    recipe = run(fast)
    assert recipe._reference.cache and list((tmp_path / "cache").glob("reference_logps_*.safetensors"))
    base_rows, fast_rows = logged(base), logged(fast)
    assert sorted(base_rows) == sorted(fast_rows) == [1, 2, 3, 4]
    for step in base_rows:
        for name in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert fast_rows[step][name] == pytest.approx(base_rows[step][name], rel=1e-4, abs=1e-5), (step, name)
    assert base_rows[4]["loss"] < base_rows[1]["loss"]


@pytest.mark.recipe
def test_recipe_group_by_length_cuts_padding(recipe_cfg, tmp_path):
    common = {"max_steps_per_epoch": 6, "batch_size": 8, "eval_dataset": None}
    plain = recipe_cfg(**common, output_dir=str(tmp_path / "plain"))
    grouped = recipe_cfg(**common, output_dir=str(tmp_path / "grouped"), group_by_length=True)
    run(plain)
    run(grouped)
    mean = lambda rows: sum(r["padding_fraction"] for r in rows.values()) / len(rows)
    plain_rows, grouped_rows = logged(plain), logged(grouped)
    assert len(grouped_rows) == 6
    assert mean(grouped_rows) < 0.5 * mean(plain_rows)
    assert all(abs(r["loss"] - 0.6931) < 0.2 for r in grouped_rows.values())  # it trains on real pairs


def test_reference_cache_key_changes_with_the_variant(tiny_setup):
    from dpo_components.checkpointing import files_digest
    from dpo_components.data import preference_dataset
    from dpo_components.reference import reference_cache_key
    from dpo_components.tiny.tokenizer import tiny_tokenizer

    data = preference_dataset(tiny_tokenizer(), source="json", data_files=str(tiny_setup / "data/eval.jsonl"),
                              split="train", max_length=96, max_prompt_length=32)  # fmt: skip
    checkpoint = files_digest(tiny_setup / "sft_model", ["model.safetensors"])
    key = partial(reference_cache_key, data, checkpoint, torch.float32)
    assert key() == key(variant="") != key(variant="quantize_base=True")  # an NF4 reference gets its own cache


@pytest.mark.recipe
def test_ipo_recipe_prefix_sharing_leaves_losses_unchanged(recipe_cfg, tmp_path):
    from helpers import IPO_CONFIG as CONFIG
    from helpers import run_ipo_recipe as run_ipo

    common = {"max_steps_per_epoch": 3, "batch_size": 8, "eval_dataset": None}
    base = recipe_cfg(CONFIG, **common, output_dir=str(tmp_path / "base"))
    shared = recipe_cfg(CONFIG, **common, output_dir=str(tmp_path / "shared"), prefix_sharing=True)
    run_ipo(base)
    run_ipo(shared)
    base_rows, shared_rows = logged(base), logged(shared)
    assert sorted(base_rows) == sorted(shared_rows) == [1, 2, 3]
    for step in base_rows:
        for name in ("loss", "ipo/margin", "logps/chosen"):
            assert shared_rows[step][name] == pytest.approx(base_rows[step][name], rel=1e-4, abs=1e-5), (step, name)


@pytest.mark.recipe
def test_group_by_length_needs_shuffle(recipe_cfg):
    from dpo_components.settings import ConfigError
    from recipes.lora_dpo_single_device import LoRADPORecipeSingleDevice

    with pytest.raises(ConfigError, match="group_by_length: true needs shuffle: true"):
        LoRADPORecipeSingleDevice(recipe_cfg(group_by_length=True, shuffle=False))


@pytest.mark.recipe
def test_compile_with_padding_buckets_leaves_losses_unchanged(recipe_cfg, tmp_path):
    """compile + pad_to_multiple_of (fewer shapes, fewer recompiles) against the eager, unpadded run."""
    from torch._dynamo.utils import counters

    common = {"max_steps_per_epoch": 3, "batch_size": 8, "eval_dataset": None}
    eager = recipe_cfg(**common, output_dir=str(tmp_path / "eager"))
    compiled = recipe_cfg(**common, output_dir=str(tmp_path / "compiled"), compile=True, pad_to_multiple_of=16)
    run(eager)
    graphs_before = counters["stats"]["unique_graphs"]
    run(compiled)
    assert counters["stats"]["unique_graphs"] > graphs_before  # it really compiled
    eager_rows, compiled_rows = logged(eager), logged(compiled)
    for step in (1, 2, 3):
        for name in ("loss", "rewards/margins"):
            assert compiled_rows[step][name] == pytest.approx(eager_rows[step][name], rel=1e-4, abs=1e-5), (step, name)
