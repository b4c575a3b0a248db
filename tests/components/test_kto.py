"""KTO on unpaired feedback: the loss against TRL's own KTOTrainer code, the KL reference point over ranks, the
unpaired data builder (formats, unrolled pairs, KL completions, bad rows), and the recipes training it."""

import json
import logging
import math
from collections import defaultdict
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from conftest import REPO_ROOT, recipe_config, run_distributed_in_process
from helpers import KTO_CONFIG, logged

from dpo_components.data import PreferenceDataError, preference_dataset, unpaired_dataset
from dpo_components.data.collate import collate_preference_batch
from dpo_components.data.prefix_sharing import collate_prefix_shared
from dpo_components.data.unpaired import kl_partners
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.losses import APOZeroUnpairedLoss, DPOLoss, KTOLoss, SequenceLogProbs, kl_estimate
from dpo_components.metrics import PreferenceMetrics
from dpo_components.settings import ConfigError
from recipes.lora_dpo_single_device import LoRADPORecipeSingleDevice

# ------------------------------------------------------------------------------------- TRL's KTO as the oracle


class _TRLModel:
    """What TRL's ``_compute_loss`` calls: ``model(input_ids, ..., labels, fused_lm_head=True).log_probs``.

    Every sequence is 2 tokens [kind, row], one scored position, so ``log_probs[i, 0]`` is row i's sequence log-prob:
    from ``main`` (kind 0, the completions, with grad) or ``kl`` (kind 1, the mismatched KL completions)."""

    training = True

    def __init__(self, main: torch.Tensor, kl: torch.Tensor) -> None:
        self.main, self.kl = main, kl

    def __call__(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, use_cache=None, **_):
        kind, row = input_ids[:, 0], input_ids[:, 1]
        logps = torch.where(kind == 0, self.main[row], self.kl[row]).unsqueeze(-1)
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros)


def trl_kto(loss_type, beta, desirable_weight, undesirable_weight, label, policy, policy_kl, ref, ref_kl):
    """TRL 1.16's ``KTOTrainer._compute_loss`` on these sequence log-probs (precomputed reference): per-example
    losses (desirable first, as TRL concatenates them), the loss, its metrics, and d loss / d policy log-probs."""
    from trl import KTOTrainer

    n = len(label)
    main = policy.clone().requires_grad_(True)
    model = _TRLModel(main, policy_kl)
    fake = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        _metrics=defaultdict(lambda: defaultdict(list)), _tp_size=1, _total_train_tokens=0, aux_loss_enabled=False,
        beta=beta, loss_type=loss_type, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        calculate_KL=loss_type == "kto", precompute_ref_logps=True,
    )  # fmt: skip
    fake._compute_kl_logps = partial(KTOTrainer._compute_kl_logps, fake)
    rows = torch.arange(n)
    batch = {
        "label": torch.tensor(label), "input_ids": torch.stack([torch.zeros(n, dtype=torch.long), rows], 1),
        "attention_mask": torch.ones(n, 2, dtype=torch.long), "completion_mask": torch.ones(n, 2, dtype=torch.long),
        "KL_input_ids": torch.stack([torch.ones(n, dtype=torch.long), rows], 1),
        "KL_attention_mask": torch.ones(n, 2, dtype=torch.long),
        "KL_completion_mask": torch.ones(n, 2, dtype=torch.long),
        "ref_logps": ref, "ref_KL_logps": ref_kl,
    }  # fmt: skip
    captured = {}
    nanmean = torch.Tensor.nanmean

    def recording_nanmean(self, *args, **kwargs):  # TRL's loss is losses.nanmean(): keep the per-example losses
        captured["losses"] = self.detach().clone()
        return nanmean(self, *args, **kwargs)

    torch.Tensor.nanmean = recording_nanmean
    try:
        loss = KTOTrainer._compute_loss(fake, model, batch, False)
    finally:
        torch.Tensor.nanmean = nanmean
    loss.backward()
    metrics = {name: values[-1] for name, values in fake._metrics["train"].items()}
    return captured["losses"], loss.detach(), metrics, main.grad


BATCHES = {
    "mixed": [True, False, True, True, False, False, True, False],
    "all_desirable": [True] * 5,
    "all_undesirable": [False] * 5,
    "imbalanced_1_to_4": [False, False, True, False, False, False, False, False, True, False],
}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.75)], ids=["unit_weights", "weighted"])
def test_losses_rewards_kl_and_gradients_equal_trls_kto(loss_type, batch, weights):
    label = BATCHES[batch]
    n = len(label)
    generator = torch.Generator().manual_seed(len(batch) + n)
    ref = -20 - 10 * torch.rand(n, generator=generator)
    ref_kl = -20 - 10 * torch.rand(n, generator=generator)
    policy = ref + torch.randn(n, generator=generator)
    policy_kl = ref_kl + torch.randn(n, generator=generator) + 0.5  # z0 > 0 in most batches: the clamp matters less
    beta, (w_d, w_u) = 0.7, weights
    trl_losses, trl_loss, trl_metrics, trl_grad = trl_kto(loss_type, beta, w_d, w_u, label, policy, policy_kl, ref,
                                                          ref_kl)  # fmt: skip

    ours = (KTOLoss if loss_type == "kto" else APOZeroUnpairedLoss)(beta, desirable_weight=w_d, undesirable_weight=w_u)
    desirable, tokens = torch.tensor(label), torch.ones(n, dtype=torch.long)
    logps = policy.clone().requires_grad_(True)
    out = ours(SequenceLogProbs(logps, policy_kl, tokens, tokens, desirable), SequenceLogProbs(ref, ref_kl, tokens,
                                                                                               tokens))  # fmt: skip
    out.losses.mean().backward()
    order = torch.cat([desirable.nonzero().flatten(), (~desirable).nonzero().flatten()])  # TRL: desirable first
    torch.testing.assert_close(out.losses.detach()[order], trl_losses, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.losses.detach().mean(), trl_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logps.grad, trl_grad, rtol=1e-5, atol=1e-8)
    metrics = PreferenceMetrics()
    metrics.update(out, SequenceLogProbs(logps, policy_kl, tokens, tokens, desirable))
    logged = metrics.compute()
    if loss_type == "kto":  # TRL skips the KL completions for apo_zero_unpaired and logs kl 0; we log the estimate
        assert logged["kl"] == pytest.approx(trl_metrics["kl"], rel=1e-6, abs=1e-7)
    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert (name in logged) == (name in trl_metrics), name
        if name in trl_metrics:
            assert logged[name] == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name
    assert logged["count/desirable"] == sum(label) and logged["count/undesirable"] == n - sum(label)


def _kl_on_rank(rank, init_file, ratios, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(ratios))
    try:
        z0 = kl_estimate(torch.tensor(ratios[rank]))
        with open(f"{results}.{rank}", "w") as f:
            f.write(str(z0.item()))
    finally:
        dist.destroy_process_group()


def test_the_kl_reference_point_is_averaged_over_ranks_as_trl_gathers_it(tmp_path):
    # rank 0's own batch mean is negative (clamped to 0 alone); the mean over ranks is positive
    ratios = [[-1.0, -0.5, 0.25], [2.0, 0.5, 1.0]]
    torch.multiprocessing.spawn(_kl_on_rank, args=(tmp_path / "pg", ratios, tmp_path / "z0"), nprocs=2)
    expected = max(0.0, sum(sum(r) / len(r) for r in ratios) / 2)  # TRL: gather_for_metrics(mean).mean().clamp(0)
    for rank in range(2):
        assert float((tmp_path / f"z0.{rank}").read_text()) == pytest.approx(expected, rel=1e-6)
    assert kl_estimate(torch.tensor(ratios[0])).item() == 0.0  # one process: its own batch, clamped


def test_float64_kto_equals_the_formula_where_beta_z0_is_large():
    """Issue 44: z0 was averaged in float32 whatever the input dtype, a relative loss error of ~1.5e-5 against
    TRL (which averages in the input dtype) where beta * |z0| is large. In float64 the loss is the formula's to
    1e-12; bf16 log-ratios are still averaged in float32."""
    generator = torch.Generator().manual_seed(0)
    n, beta = 64, 0.1
    ratios = 300.0 + torch.randn(n, dtype=torch.float64, generator=generator)  # r near z0 ~ 300: beta * z0 ~ 30
    kl_ratios = 300.0 + torch.randn(n, dtype=torch.float64, generator=generator) * 1e-3
    desirable = torch.arange(n) % 2 == 0
    policy = SequenceLogProbs(ratios, kl_ratios, torch.full((n,), 8), torch.full((n,), 8), desirable=desirable)
    reference = SequenceLogProbs(torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64),
                                 torch.full((n,), 8), torch.full((n,), 8), desirable=desirable)  # fmt: skip
    out = KTOLoss(beta=beta)(policy, reference)
    z0 = max(0.0, sum(kl_ratios.tolist()) / n)  # Python floats: the formula in double precision
    for i in range(n):
        r = ratios[i].item()
        x = beta * (r - z0) if desirable[i] else beta * (z0 - r)
        expected = 1 - 1 / (1 + math.exp(-x))
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert out.losses.dtype == torch.float64 and kl_estimate(kl_ratios).dtype == torch.float64
    assert kl_estimate(kl_ratios.to(torch.bfloat16)).dtype == torch.float32


def test_class_balance_warning_follows_the_papers_eq_8_bounds():
    loss = KTOLoss()
    warning = loss.class_balance_warning(100, 400)  # 1:4, unit weights: desirable_weight should be in [4, 5.32]
    assert "[4.0, 5.32]" in warning and "[0.19, 0.25]" in warning
    assert KTOLoss(desirable_weight=4.0).class_balance_warning(100, 400) is None
    assert KTOLoss(undesirable_weight=0.25).class_balance_warning(100, 400) is None
    assert loss.class_balance_warning(300, 300) is None


def test_a_pairwise_loss_refuses_unpaired_rows_and_kto_refuses_pairs():
    tokens, x = torch.ones(2, dtype=torch.long), torch.zeros(2)
    unpaired = SequenceLogProbs(x, x, tokens, tokens, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="unpaired rows"):
        DPOLoss()(unpaired, SequenceLogProbs(x, x, tokens, tokens))
    with pytest.raises(ValueError, match="unpaired_dataset"):
        KTOLoss()(SequenceLogProbs(x, x, tokens, tokens), SequenceLogProbs(x, x, tokens, tokens))


# ------------------------------------------------------------------------------------------------------ data


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


UNPAIRED = [
    {"prompt": "the plot was", "completion": "great .", "label": True},
    {"prompt": "the plot was", "completion": "dull .", "label": False},
    {"prompt": "the music felt", "completion": "superb .", "label": True},
    {"prompt": "the acting seemed", "completion": "wooden .", "label": False},
]


def test_unpaired_rows_tokenize_as_a_side_of_a_pair_with_another_prompts_completion_for_kl(tokenizer, tmp_path):
    data = unpaired_dataset(tokenizer, source="json", data_files=str(write_jsonl(tmp_path / "u.jsonl", UNPAIRED)),
                            max_length=64)  # fmt: skip
    as_pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "x ."} for r in UNPAIRED]
    pairs = preference_dataset(tokenizer, source="json", max_length=64,
                               data_files=str(write_jsonl(tmp_path / "p.jsonl", as_pairs)))  # fmt: skip
    assert data.data_kind == "unpaired" and (data.desirable_count, data.undesirable_count) == (2, 2)
    partners, _ = kl_partners([r["prompt"] for r in UNPAIRED])
    assert sorted(partners) == [0, 1, 2, 3]  # every completion is one row's KL completion
    for i, sample in enumerate(data):
        assert sample["desirable"] == UNPAIRED[i]["label"]
        assert sample["prompt_ids"] == pairs[i]["prompt_ids"]
        assert sample["chosen_response_ids"] == pairs[i]["chosen_response_ids"]  # the completion, as a pair's side
        assert UNPAIRED[partners[i]]["prompt"] != UNPAIRED[i]["prompt"]
        assert sample["rejected_response_ids"] == pairs[partners[i]]["chosen_response_ids"]  # partner's completion
    # the same rows in TRL's conversational form tokenize identically
    conversational = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                       "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]}
                      for r in UNPAIRED]  # fmt: skip
    again = unpaired_dataset(tokenizer, source="json", max_length=64,
                             data_files=str(write_jsonl(tmp_path / "c.jsonl", conversational)))  # fmt: skip
    assert again.content_hash() == data.content_hash()
    flipped = [{**r, "label": not r["label"]} for r in UNPAIRED]
    other = unpaired_dataset(tokenizer, source="json", max_length=64,
                             data_files=str(write_jsonl(tmp_path / "f.jsonl", flipped)))  # fmt: skip
    assert other.content_hash() != data.content_hash()  # labels are part of the data's identity (resume, cache)


def test_pairs_unroll_into_desirable_and_undesirable_rows(tokenizer, tiny_setup):
    pairs = preference_dataset(tokenizer, source="json", data_files=str(tiny_setup / "data/eval.jsonl"),
                               max_length=96, max_prompt_length=32)  # fmt: skip
    rows = unpaired_dataset(tokenizer, source="json", data_files=str(tiny_setup / "data/eval.jsonl"),
                            max_length=96, max_prompt_length=32)  # fmt: skip
    assert len(rows) == 2 * len(pairs) and rows.desirable_count == len(pairs)
    for i in range(len(pairs)):
        good, bad = rows[2 * i], rows[2 * i + 1]
        assert good["desirable"] and not bad["desirable"]
        assert good["prompt_ids"] == bad["prompt_ids"] == pairs[i]["prompt_ids"]
        assert good["chosen_response_ids"] == pairs[i]["chosen_response_ids"]
        assert bad["chosen_response_ids"] == pairs[i]["rejected_response_ids"]
        assert rows.row_numbers[2 * i] == rows.row_numbers[2 * i + 1] == pairs.row_numbers[i]


def test_a_long_kl_completion_is_cut_to_the_rows_budget_without_shortening_its_prompt(tokenizer, tmp_path):
    long = " ".join(["so very dull"] * 30) + " ."
    rows = [{"prompt": "the plot was great . the music felt superb . the acting seemed", "completion": "great .",
             "label": True},
            {"prompt": "the music felt", "completion": long, "label": False}]  # fmt: skip
    data = unpaired_dataset(tokenizer, source="json", data_files=str(write_jsonl(tmp_path / "u.jsonl", rows)),
                            max_length=40, max_prompt_length=16)  # fmt: skip
    first = data[0]
    short = unpaired_dataset(tokenizer, source="json", max_length=40, max_prompt_length=16, data_files=str(
        write_jsonl(tmp_path / "s.jsonl", [rows[0], {**rows[1], "completion": "dull ."}])))  # fmt: skip
    assert len(first["prompt_ids"]) > 16  # longer than max_prompt_length: not cut, its own row fits
    assert first["prompt_ids"] == short[0]["prompt_ids"]  # decided by the row's own completion
    assert len(first["prompt_ids"]) + len(first["rejected_response_ids"]) == 40


@pytest.mark.parametrize(
    ("bad", "message"),
    [({"label": None}, "missing 'label'"), ({"label": "yes"}, "'label' must be a bool .* got str 'yes'"),
     ({"label": 1}, "'label' must be a bool .* got int 1"), ({"completion": None}, "missing 'completion'")],
)  # fmt: skip
def test_a_bad_label_is_an_error_naming_file_and_row(tokenizer, tmp_path, bad, message):
    rows = [dict(r) for r in UNPAIRED]
    rows[2].update(bad)
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PreferenceDataError, match=f"bad.jsonl .*row 2 \\(line 3\\): {message}"):
        unpaired_dataset(tokenizer, source="json", data_files=str(path), max_length=64)
    skipped = unpaired_dataset(tokenizer, source="json", data_files=str(path), max_length=64, on_bad_row="skip")
    assert len(skipped) == 3 and sum(skipped.skipped.values()) == 1


def test_one_class_is_an_error_and_unpaired_rows_in_a_preference_dataset_are_named(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "good.jsonl", [{**r, "label": True} for r in UNPAIRED])
    with pytest.raises(PreferenceDataError, match="good.jsonl .*all 4 rows have label true"):
        unpaired_dataset(tokenizer, source="json", data_files=str(path), max_length=64)
    with pytest.raises(PreferenceDataError, match="row 0 .*unpaired row .*unpaired_dataset"):
        preference_dataset(tokenizer, source="json", data_files=str(path), max_length=64)


def test_column_map_renames_completion_and_label(tokenizer, tmp_path):
    renamed = [{"question": r["prompt"], "answer": r["completion"], "thumbs_up": r["label"]} for r in UNPAIRED]
    data = unpaired_dataset(tokenizer, source="json", data_files=str(write_jsonl(tmp_path / "r.jsonl", renamed)),
                            max_length=64, column_map={"prompt": "question", "completion": "answer",
                                                       "label": "thumbs_up"})  # fmt: skip
    plain = unpaired_dataset(tokenizer, source="json", data_files=str(write_jsonl(tmp_path / "u.jsonl", UNPAIRED)),
                             max_length=64)  # fmt: skip
    assert data.content_hash() == plain.content_hash()


def test_prefix_shared_rows_score_unpaired_batches_as_the_standard_layout(tokenizer, tiny_setup):
    from dpo_components.tiny.task_eval import load_tiny_checkpoint

    model = load_tiny_checkpoint(tiny_setup / "sft_model", tiny_setup / "scratch_kto")
    rows = unpaired_dataset(tokenizer, source="json", data_files=str(tiny_setup / "data/eval.jsonl"),
                            max_length=96, max_prompt_length=32)  # fmt: skip
    samples = [rows[i] for i in range(6)]
    with torch.no_grad():  # one forward over completions and KL completions
        standard = concatenated_logprobs(model, collate_preference_batch(samples, padding_idx=tokenizer.pad_id))
        shared = concatenated_logprobs(model, collate_prefix_shared(samples, padding_idx=tokenizer.pad_id))
    # with grad, the KL completions get a no-grad forward of their own
    split = concatenated_logprobs(model, collate_preference_batch(samples, padding_idx=tokenizer.pad_id))
    for other in (shared, split):
        torch.testing.assert_close(other.chosen_logps, standard.chosen_logps, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(other.rejected_logps, standard.rejected_logps, rtol=1e-5, atol=1e-4)
        assert torch.equal(other.desirable, torch.tensor([s["desirable"] for s in samples]))
    weight = model.layers[0].attn.q_proj.weight
    (kl_grad,) = torch.autograd.grad(split.rejected_logps.sum(), weight, retain_graph=True, allow_unused=True)
    (grad,) = torch.autograd.grad(split.chosen_logps.sum(), weight)
    assert (kl_grad is None or not kl_grad.any()) and grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- recipes


def kto_cfg(recipe_cfg, **overrides):
    return recipe_cfg(KTO_CONFIG, **{"loss.beta": 0.5, "batch_size": 16, "optimizer.lr": 3e-3,
                                     "lr_scheduler.num_warmup_steps": 2, **overrides})  # fmt: skip


def train(cfg):
    recipe = LoRADPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()
    return recipe


@pytest.mark.recipe
def test_kto_trains_through_the_lora_recipe_and_resumes_exactly(recipe_cfg, tmp_path, caplog):
    from safetensors.torch import load_file

    caplog.set_level(logging.INFO)
    full = kto_cfg(recipe_cfg, max_steps_per_epoch=12, save_every_n_steps=6, eval_every_n_steps=12)
    train(full)
    assert "256 desirable and 256 undesirable rows" in caplog.text
    rows = logged(full)
    early = sum(rows[s]["loss"] for s in (1, 2, 3)) / 3
    late = sum(rows[s]["loss"] for s in (10, 11, 12)) / 3
    assert late < early - 0.02, (early, late)
    assert {"kl", "rewards/accuracies", "count/desirable", "count/undesirable"} <= set(rows[12])
    assert rows[12]["eval/rewards/chosen"] > rows[12]["eval/rewards/rejected"]  # desirable rows gained reward

    resumed = kto_cfg(recipe_cfg, max_steps_per_epoch=12, save_every_n_steps=6, eval_every_n_steps=12,
                      output_dir=str(tmp_path / "resumed"))  # fmt: skip
    partial_cfg = kto_cfg(recipe_cfg, max_steps_per_epoch=12, save_every_n_steps=6, eval_every_n_steps=12,
                          output_dir=str(tmp_path / "resumed"))  # fmt: skip
    first_half = LoRADPORecipeSingleDevice(partial_cfg)
    first_half.setup(partial_cfg)
    _train_until(first_half, 6)
    resumed.resume_from_checkpoint = True
    train(resumed)
    a = load_file(tmp_path / "out/step_12/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "resumed/step_12/adapter/adapter_model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _train_until(recipe, step):
    """Train ``recipe`` and stop it right after the checkpoint of ``step`` (a run killed there)."""
    save = recipe.save_checkpoint

    class Stop(Exception):
        pass

    def save_then_stop():
        path = save()
        if recipe.progress.global_step == step:
            raise Stop
        return path

    recipe.save_checkpoint = save_then_stop
    with pytest.raises(Stop):
        recipe.train()


@pytest.mark.recipe
def test_precomputed_reference_covers_the_kl_completions(recipe_cfg, tmp_path):
    live = kto_cfg(recipe_cfg, max_steps_per_epoch=3, output_dir=str(tmp_path / "live"))
    cached = kto_cfg(recipe_cfg, max_steps_per_epoch=3, output_dir=str(tmp_path / "cached"),
                     **{"reference.mode": "precomputed", "reference.cache_dir": str(tmp_path / "cache")})  # fmt: skip
    train(live)
    train(cached)
    a, b = logged(live), logged(cached)
    for step in (1, 2, 3):
        for name in ("loss", "kl", "rewards/chosen", "rewards/rejected"):
            assert b[step][name] == pytest.approx(a[step][name], rel=1e-4, abs=1e-6), (step, name)


@pytest.mark.recipe
def test_the_wrong_data_kind_is_refused_at_setup(recipe_cfg):
    cfg = kto_cfg(recipe_cfg, **{"dataset._component_": "dpo_components.data.preference_dataset"})
    with pytest.raises(ConfigError, match="dataset: KTOLoss trains on unpaired rows .*unpaired_dataset"):
        LoRADPORecipeSingleDevice(cfg).setup(cfg)
    cfg = kto_cfg(recipe_cfg, **{"loss._component_": "dpo_components.losses.DPOLoss"})
    del cfg.loss.desirable_weight, cfg.loss.undesirable_weight
    with pytest.raises(ConfigError, match="DPOLoss trains on preference pairs .*KTOLoss"):
        LoRADPORecipeSingleDevice(cfg).setup(cfg)


@pytest.mark.recipe
def test_kto_trains_in_both_fsdp2_recipes(tiny_setup, tmp_path, caplog):
    from recipes.full_dpo_distributed import FullDPORecipeDistributed
    from recipes.lora_dpo_distributed import LoRADPORecipeDistributed

    caplog.set_level(logging.INFO)
    pairs = [json.loads(line) for line in (tiny_setup / "data/train.jsonl").read_text().splitlines()][:64]
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in pairs[:16]]
    rows += [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in pairs]
    data = write_jsonl(tmp_path / "imbalanced.jsonl", rows)
    recipes = ((FullDPORecipeDistributed, "recipe_configs/tiny/full_dpo_distributed.yaml"),
               (LoRADPORecipeDistributed, "recipe_configs/tiny/lora_dpo_distributed.yaml"))
    for recipe_class, config in recipes:
        out = tmp_path / recipe_class.__name__
        args = [f"output_dir={out}", f"checkpointer.checkpoint_dir={tiny_setup / 'sft_model'}",
                "dataset._component_=dpo_components.data.unpaired_dataset", f"dataset.data_files={data}",
                "eval_dataset._component_=dpo_components.data.unpaired_dataset",
                f"eval_dataset.data_files={tiny_setup / 'data/eval.jsonl'}", "eval_dataset.split=train[:16]",
                "loss._component_=dpo_components.losses.KTOLoss", "loss.beta=0.5",
                "batch_size=8", "max_steps_per_epoch=2", "log_every_n_steps=1", "eval_every_n_steps=null",
                "save_every_n_steps=null", "eval_samples=0", "reference.mode=precomputed",
                f"reference.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
        args += ["~loss.label_smoothing"] if "lora" in config else []
        run_distributed_in_process(recipe_class, recipe_config(config, args), tmp_path / f"pg_{out.name}")
        logs = logged(type("Cfg", (), {"output_dir": str(out)}))
        assert {"kl", "rewards/chosen", "count/desirable"} <= set(logs[2]), recipe_class.__name__
        assert 0.0 <= logs[2]["eval/rewards/accuracies"] <= 1.0 and torch.isfinite(torch.tensor(logs[2]["loss"]))
    assert "16 desirable and 64 undesirable rows" in caplog.text and "desirable_weight in [4.0, 5.32]" in caplog.text


@pytest.mark.recipe
def test_the_tiny_kto_config_runs_through_tune_run(tiny_setup, tmp_path):
    import subprocess

    out = tmp_path / "tune"
    args = [f"output_dir={out}", f"checkpointer.checkpoint_dir={tiny_setup / 'sft_model'}",
            f"dataset.data_files={tiny_setup / 'data/train.jsonl'}", "prepare=null",
            f"eval_dataset.data_files={tiny_setup / 'data/eval.jsonl'}", "max_steps_per_epoch=2",
            "eval_samples=2", "max_new_tokens=8", "save_every_n_steps=null", "eval_every_n_steps=null",
            "log_every_n_steps=1"]  # fmt: skip
    result = subprocess.run(["tune", "run", "recipes/lora_dpo_single_device.py", "--config", KTO_CONFIG, *args],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "step_2" / "adapter" / "adapter_model.safetensors").exists()


def test_zero_gradient_watch_warns_once_after_its_patience():
    from dpo_components.metrics import ZeroGradientWatch

    watch = ZeroGradientWatch(KTOLoss(), patience=3)
    assert [watch.update(g, s) for s, g in enumerate([0.0, 0.0, 0.3, 0.0, 0.0], start=1)] == [None] * 5  # reset
    message = watch.update(0.0, 6)
    assert "exactly 0 for 3 steps in a row (steps 4-6): KTOLoss is saturated" in message
    assert "loss.desirable_weight" in message  # the unpaired hint
    assert watch.update(0.0, 7) is None  # once


@pytest.mark.recipe
def test_a_saturated_loss_is_named_by_the_recipe(recipe_cfg, caplog):
    """SimPO with a target margin of -1000: the sigmoid is flat from step 1, every gradient exactly 0."""
    caplog.set_level(logging.WARNING)
    cfg = recipe_cfg(max_steps_per_epoch=6, batch_size=8, eval_dataset=None,
                     **{"loss._component_": "dpo_components.losses.SimPOLoss", "loss.gamma": -1000.0})  # fmt: skip
    train(cfg)
    assert logged(cfg)[6]["grad_norm"] == 0.0
    assert "exactly 0 for 5 steps in a row (steps 1-5): SimPOLoss is saturated and nothing trains" in caplog.text
