"""max_micro_batch_tokens: a step's pairs in micro-batches by computed tokens. Each micro-batch stays within the budget
and every pair is in exactly one; weighted by its share of the step's pairs, the micro-batches give the gradient of
one pass over the step (and dividing by their number does not); FSDP ranks agree on the count; the recipes take
the same steps as without a budget and resume exactly."""

import shutil
from pathlib import Path

import pytest
import torch
from conftest import recipe_config, run_distributed_in_process
from helpers import logged
from helpers import run_lora_recipe as run
from safetensors.torch import load_file
from test_speedups import random_pairs

from dpo_components.data.collate import PreferenceCollator, batch_positions
from dpo_components.data.micro_batches import check_pairs_fit_budget, plan_micro_batches, split_to_count
from dpo_components.data.recipe_data import RecipeData
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.losses import DPOLoss, IPOLoss, SequenceLogProbs, SimPOLoss
from dpo_components.models.document_attention import document_attention
from dpo_components.settings import ConfigError
from dpo_components.tiny.model import tiny_llama

LAYOUTS = {
    "standard": {},
    "shared": {"prefix_sharing": True},
    "packed": {"packing": True, "packing_row_tokens": 64},
    "packed+shared": {"packing": True, "prefix_sharing": True, "packing_row_tokens": 64},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_positions_are_counted_as_the_collated_batch_has_them(layout):
    collate = PreferenceCollator(0, pad_to_multiple_of=4, **LAYOUTS[layout])
    for n, seed in ((1, 0), (3, 1), (12, 2)):
        pairs = random_pairs(n, seed)
        assert (collate.data_positions(pairs), collate.computed_positions(pairs)) == batch_positions(collate(pairs))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_micro_batches_by_tokens_hold_every_pair_once_within_the_budget(layout):
    collate = PreferenceCollator(0, **LAYOUTS[layout])
    pairs = random_pairs(16)
    budget = 3 * max(collate.computed_positions([pair]) for pair in pairs)
    plan = plan_micro_batches(pairs, 4, budget, collate)
    assert sorted(i for members in plan for i in members) == list(range(16))
    assert all(members == sorted(members) for members in plan) and plan == sorted(plan)
    for members in plan:
        assert batch_positions(collate([pairs[i] for i in members]))[1] <= budget
    assert 1 < len(plan) < 16 and len({len(members) for members in plan}) > 1  # uneven, as lengths are
    assert plan_micro_batches(pairs, 4, None, collate) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert plan_micro_batches([dict(pair) for pair in pairs], 4, budget, collate) == plan  # deterministic


def test_a_pair_over_the_budget_is_named_at_setup():
    class Data(list):
        source, row_numbers = "train.jsonl", list(range(2, 20))

    collate = PreferenceCollator(0)
    pairs = Data(random_pairs(6))
    costs = [collate.computed_positions([pair]) for pair in pairs]
    check_pairs_fit_budget(max(costs), collate, dataset=pairs)
    worst = costs.index(max(costs))
    with pytest.raises(ValueError, match=rf"pair {worst} of dataset \(train.jsonl row {worst + 2}\) alone computes "
                                         rf"{max(costs)} positions .* max_micro_batch_tokens {max(costs) - 1}"):
        check_pairs_fit_budget(max(costs) - 1, collate, dataset=pairs)
    with pytest.raises(ValueError, match="alone computes"):
        plan_micro_batches(list(pairs), 2, max(costs) - 1, collate)


def test_split_to_count_by_hand():
    assert split_to_count([[0, 1, 2, 3, 4], [5, 6]], 3) == [[0, 1], [2, 3, 4], [5, 6]]
    assert split_to_count([[0, 1, 2, 3, 4], [5, 6]], 4) == [[0, 1], [2], [3, 4], [5, 6]]
    assert split_to_count([[0, 1]], 1) == [[0, 1]]
    for count in (1, 8):
        with pytest.raises(ValueError, match="cannot split"):
            split_to_count([[0, 1, 2, 3, 4], [5, 6]], count)


LOSSES = {"dpo": lambda: DPOLoss(beta=0.5), "ipo": lambda: IPOLoss(beta=0.5), "simpo": lambda: SimPOLoss(beta=2.0)}


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_weighted_micro_batches_give_the_gradient_of_one_pass(kind):
    """Reference-based (DPO), length-normalised (IPO) and reference-free (SimPO)."""
    torch.manual_seed(0)
    model = document_attention(tiny_llama())
    collate = PreferenceCollator(0, prefix_sharing=True, packing=True, packing_row_tokens=64)
    pairs = [pair for seed in range(2) for pair in random_pairs(6, seed)]
    for i, pair in enumerate(pairs):
        pair["index"] = i
    loss_fn = LOSSES[kind]()
    with torch.no_grad():
        reference = concatenated_logprobs(model, collate(pairs)) if loss_fn.needs_reference else None

    def gradients(micro_batches, divisor):
        model.zero_grad()
        for members in micro_batches:
            sub_reference = None if reference is None else SequenceLogProbs(
                reference.chosen_logps[members], reference.rejected_logps[members],
                reference.chosen_tokens[members], reference.rejected_tokens[members])  # fmt: skip
            losses = loss_fn(concatenated_logprobs(model, collate([pairs[i] for i in members])), sub_reference).losses
            (losses.mean() / divisor(members)).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plan = plan_micro_batches(pairs, 4, 2 * max(collate.computed_positions([pair]) for pair in pairs), collate)
    assert len({len(members) for members in plan}) > 1
    one_pass = gradients([list(range(len(pairs)))], lambda members: 1)
    weighted = gradients(plan, lambda members: len(pairs) / len(members))  # the recipes' weighting
    equal = gradients(plan, lambda members: len(plan))  # each micro-batch's mean counted alike: wrong
    for name, grad in one_pass.items():
        torch.testing.assert_close(weighted[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert max((equal[n] - g).abs().max() / g.abs().max() for n, g in one_pass.items() if g.abs().max() > 0) > 1e-2


def _agree_on_rank(rank, scratch, plans, out):
    import torch.distributed as dist

    from dpo_components.distributed import agree_micro_batches

    dist.init_process_group("gloo", init_method=f"file://{scratch}", rank=rank, world_size=2)
    try:
        (out.parent / f"{out.name}.{rank}").write_text(repr(agree_micro_batches(plans[rank], torch.device("cpu"))))
    finally:
        dist.destroy_process_group()


def test_fsdp_ranks_agree_on_the_number_of_micro_batches(tmp_path):
    plans = [[[0, 1, 2, 3]], [[0], [1, 2], [3]]]
    torch.multiprocessing.spawn(_agree_on_rank, args=(tmp_path / "pg", plans, tmp_path / "plan"), nprocs=2)
    assert (tmp_path / "plan.0").read_text() == repr([[0], [1], [2, 3]])
    assert (tmp_path / "plan.1").read_text() == repr(plans[1])


# SGD with momentum: the weights after a step compare the gradients themselves (see test_lora_dpo_distributed.py)
SGD = {"optimizer._component_": "torch.optim.SGD", "optimizer.lr": 0.5, "optimizer.momentum": 0.9,
       "~optimizer.weight_decay": None}  # fmt: skip


@pytest.mark.recipe
def test_the_recipe_takes_the_same_steps_by_tokens_and_resumes_exactly(recipe_cfg, tmp_path, monkeypatch):
    """Steps of 8 pairs: one micro-batch, and by a budget of about 3 pairs (micro-batches of uneven size), in the
    standard layout and packed with prefix sharing; then a budgeted run killed after step 2 resumes bit for bit."""
    sizes = []
    plan = RecipeData.micro_batches
    monkeypatch.setattr(RecipeData, "micro_batches", lambda self, samples: sizes.append(
        [len(m) for m in plan(self, samples)]) or plan(self, samples))  # fmt: skip
    common = {"max_steps_per_epoch": 4, "batch_size": 4, "gradient_accumulation_steps": 2, "eval_dataset": None,
              "optimizer._component_": "torch.optim.SGD", "optimizer.lr": 0.5, "optimizer.momentum": 0.9}
    runs = {"one": {"batch_size": 8, "gradient_accumulation_steps": 1},
            "tokens": {"max_micro_batch_tokens": 200},
            "packed": {"max_micro_batch_tokens": 150, "packing": True, "prefix_sharing": True, "save_every_n_steps": 2}}
    weights, losses = {}, {}
    for name, extra in runs.items():
        cfg = recipe_cfg(**{**common, **extra, "output_dir": str(tmp_path / name)})
        sizes.clear()
        run(cfg)
        weights[name] = load_file(tmp_path / name / "step_4/adapter/adapter_model.safetensors")
        losses[name] = {step: row["loss"] for step, row in logged(cfg).items()}
        if name != "one":
            assert any(len(set(step)) > 1 for step in sizes) and all(sum(step) == 8 for step in sizes), sizes
        assert weights[name]["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].abs().max() > 1e-4
        for key, value in weights["one"].items():
            torch.testing.assert_close(weights[name][key], value, rtol=1e-4, atol=1e-6, msg=(name, key))
        assert sorted(losses[name]) == [1, 2, 3, 4]
        for step, loss in losses[name].items():
            assert loss == pytest.approx(losses["one"][step], rel=1e-4), (name, step)
    shutil.copytree(tmp_path / "packed/step_2", tmp_path / "resumed/step_2")
    resumed = recipe_cfg(**{**common, **runs["packed"], "output_dir": str(tmp_path / "resumed"),
                            "resume_from_checkpoint": True})  # fmt: skip
    run(resumed)
    assert sorted(logged(resumed)) == [3, 4]
    again = load_file(tmp_path / "resumed/step_4/adapter/adapter_model.safetensors")
    for key, value in weights["packed"].items():
        assert torch.equal(again[key], value), key


@pytest.mark.recipe
def test_the_fsdp2_and_ipo_recipes_take_the_same_steps_by_tokens(tiny_setup, tmp_path, monkeypatch):
    """FSDP2 in-process with 1 rank (2 ranks: test_lora_dpo_distributed.py) and the IPO recipe: by tokens == fixed."""
    sizes = []
    plan = RecipeData.micro_batches
    monkeypatch.setattr(RecipeData, "micro_batches", lambda self, samples: sizes.append(
        (self.max_micro_batch_tokens, [len(m) for m in plan(self, samples)])) or plan(self, samples))  # fmt: skip
    from helpers import IPO_CONFIG
    from helpers import run_ipo_recipe as run_ipo

    from recipes.full_dpo_distributed import FullDPORecipeDistributed

    def args(out, budget):
        return [f"output_dir={out}", f"checkpointer.checkpoint_dir={tiny_setup / 'sft_model'}",
                f"dataset.data_files={tiny_setup / 'data/train.jsonl'}", "eval_dataset=null", "batch_size=8",
                "max_steps_per_epoch=2", "log_every_n_steps=1", "eval_every_n_steps=null", "save_every_n_steps=null",
                "eval_samples=0", "prepare=null", f"max_micro_batch_tokens={budget}",
                *[f"{k}={v}" if v is not None else k for k, v in SGD.items()]]  # fmt: skip

    start = load_file(tiny_setup / "sft_model" / "model.safetensors")
    out = {budget: tmp_path / f"full_{budget}" for budget in ("null", 200)}
    for budget, where in out.items():
        run_distributed_in_process(FullDPORecipeDistributed,
                                   recipe_config("recipe_configs/tiny/full_dpo_distributed.yaml", args(where, budget)),
                                   tmp_path / f"pg_{budget}")  # fmt: skip
    ipo = {budget: recipe_config(IPO_CONFIG, args(tmp_path / f"ipo_{budget}", budget)) for budget in ("null", 200)}
    for cfg in ipo.values():
        run_ipo(cfg)
    out.update({f"ipo_{budget}": Path(cfg.output_dir) for budget, cfg in ipo.items()})
    by_tokens = [split for budget, split in sizes if budget]
    assert by_tokens and all(sum(split) == 8 for split in by_tokens) and any(len(set(s)) > 1 for s in by_tokens)
    for fixed, by_tokens in (("null", 200), ("ipo_null", "ipo_200")):
        rows = [logged(type("Cfg", (), {"output_dir": str(out[key])})) for key in (fixed, by_tokens)]
        assert sorted(rows[0]) == sorted(rows[1]) and len(rows[0]) >= 2
        for step in rows[0]:
            assert rows[1][step]["loss"] == pytest.approx(rows[0][step]["loss"], rel=1e-5), (by_tokens, step)
        last = f"step_{max(rows[0])}/model-00001-of-00001.safetensors"
        expected, got = (load_file(out[key] / last) for key in (fixed, by_tokens))
        moved = 0.0
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=(by_tokens, key))
            moved = max(moved, (value.float() - start[key].float()).abs().max().item()) if key in start else moved
        assert moved > 1e-3  # the steps changed the weights


@pytest.mark.recipe
def test_batch_coupled_losses_refuse_a_budget_in_every_single_device_recipe(recipe_cfg, tiny_setup):
    from helpers import KTO_CONFIG

    from recipes.online_dpo_single_device import OnlineDPORecipeSingleDevice

    with pytest.raises(ConfigError, match="max_micro_batch_tokens is not supported with KTOLoss: a row's loss"):
        run(recipe_cfg(KTO_CONFIG, max_micro_batch_tokens=4096), train=False)
    with pytest.raises(ConfigError, match="max_micro_batch_tokens is not supported with AOTLoss: a row's loss"):
        run(recipe_cfg(**{"loss._component_": "dpo_components.losses.AOTLoss", "max_micro_batch_tokens": 4096}),
            train=False)  # fmt: skip
    for bad in (0, True):
        with pytest.raises(ConfigError, match="max_micro_batch_tokens must be a positive integer"):
            run(recipe_cfg(max_micro_batch_tokens=bad), train=False)
    online = recipe_cfg("recipe_configs/tiny/online_dpo_single_device.yaml", max_micro_batch_tokens=4096,
                        **{"loss._component_": "dpo_components.losses.AOTLoss",
                           "prompt_dataset.data_files": str(tiny_setup / "data/train.jsonl")})  # fmt: skip
    with pytest.raises(ConfigError, match="max_micro_batch_tokens is not supported with AOTLoss: a row's loss"):
        OnlineDPORecipeSingleDevice(online).setup(online)  # the online recipe takes a budget, but not AOT's
