"""What all five recipes promise alike, tested once over all of them (the FSDP2 recipes as one gloo rank in this
process): a NaN loss stops before the optimizer step naming the last good checkpoint; a fresh run refuses an
output_dir holding an earlier run's checkpoints, and overwrite_output_dir takes it; the online recipe's steps by
tokens equal its fixed micro-batches, as the offline recipes' do (tests/components/test_micro_batches.py)."""

import json

import pytest
import torch
from conftest import recipe_config, run_distributed_in_process
from helpers import logged, run_recipe
from omegaconf import OmegaConf
from safetensors.torch import load_file

from dpo_components.losses import DPOLoss
from dpo_components.settings import ConfigError
from recipes import online_dpo_single_device as online_recipe
from recipes.full_dpo_distributed import FullDPORecipeDistributed
from recipes.ipo_single_device import IPORecipeSingleDevice
from recipes.lora_dpo_distributed import LoRADPORecipeDistributed
from recipes.lora_dpo_single_device import LoRADPORecipeSingleDevice
from recipes.online_dpo_single_device import OnlineDPORecipeSingleDevice

RECIPES = {
    "lora_dpo_single_device": LoRADPORecipeSingleDevice,
    "ipo_single_device": IPORecipeSingleDevice,
    "online_dpo_single_device": OnlineDPORecipeSingleDevice,
    "full_dpo_distributed": FullDPORecipeDistributed,
    "lora_dpo_distributed": LoRADPORecipeDistributed,
}
# the online recipe: one round of 16 prompts x 4 samples, short responses, 2 steps
ONLINE = ["online.rounds=1", "online.prompts_per_round=16", "online.max_new_tokens=16", "online.steps_per_round=2"]


def tiny_config(name, tiny_setup, out, *args):
    """The tiny config of recipe ``name`` on the tests' tiny setup: 4 pairs a step, a step per log line, no eval."""
    data = "prompt_dataset" if name.startswith("online") else "dataset"
    common = [f"output_dir={out}", "prepare=null", f"checkpointer.checkpoint_dir={tiny_setup / 'sft_model'}",
              f"{data}.data_files={tiny_setup / 'data/train.jsonl'}", "eval_dataset=null", "eval_every_n_steps=null",
              "eval_samples=0", "log_every_n_steps=1", "batch_size=4", "save_every_n_steps=null"]  # fmt: skip
    steps = ONLINE if name.startswith("online") else ["max_steps_per_epoch=2"]
    return recipe_config(f"recipe_configs/tiny/{name}.yaml", common + steps + list(args))


def run(name, cfg, scratch):
    if "distributed" in name:
        return run_distributed_in_process(RECIPES[name], cfg, scratch)
    return run_recipe(RECIPES[name], cfg)


class NaNAtSecondStep(DPOLoss):
    """DPO whose second call (the second step: one micro-batch a step, no eval) returns NaN losses."""

    calls = 0

    def forward(self, policy, reference=None):
        out = super().forward(policy, reference)
        NaNAtSecondStep.calls += 1
        if NaNAtSecondStep.calls == 2:
            out.losses = out.losses * float("nan")
        return out


@pytest.mark.parametrize("name", RECIPES)
def test_a_nan_loss_stops_before_the_optimizer_step_naming_the_last_good_checkpoint(name, tiny_setup, tmp_path):
    NaNAtSecondStep.calls = 0
    out = tmp_path / "out"
    cfg = tiny_config(name, tiny_setup, out, "save_every_n_steps=1", "reference.mode=model")
    cfg.loss = OmegaConf.create({"_component_": "test_recipe_contract.NaNAtSecondStep", "beta": 0.1})
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 2.*Last good checkpoint: .*step_1"):
        run(name, cfg, tmp_path / "pg")
    assert (out / "step_1" / "manifest.json").exists() and not (out / "step_2").exists()
    # every recipe writes the data report of what it trains on (dpo_components.data.report)
    report = json.loads((out / "data_report.json").read_text())
    data = report["prompt_dataset" if name.startswith("online") else "dataset"]
    assert data["rows_read"] == len((tiny_setup / "data/train.jsonl").read_text().splitlines())


@pytest.mark.parametrize("name", RECIPES)
def test_a_fresh_run_refuses_an_earlier_runs_checkpoints(name, tiny_setup, tmp_path, one_rank_group):
    out = tmp_path / "out"
    (out / "step_36").mkdir(parents=True)
    cfg = tiny_config(name, tiny_setup, out)
    with pytest.raises(ConfigError, match=r"holds checkpoints of an earlier run \(step_36\).*overwrite_output_dir"):
        RECIPES[name](cfg).setup(cfg)
    assert (out / "step_36").exists()


def test_online_steps_by_tokens_equal_its_fixed_micro_batches(tiny_setup, tmp_path, monkeypatch):
    """Each online step of 8 pairs as two micro-batches of 4, or by max_micro_batch_tokens (here 3 + 3 + 2 pairs,
    each micro-batch weighted by its share of the step's pairs): the same adapters and logged losses. SGD compares
    the gradients themselves (Adam's first step would turn fp32 rounding into lr-sized differences)."""
    planned = []
    plan = online_recipe.plan_micro_batches
    monkeypatch.setattr(online_recipe, "plan_micro_batches", lambda *args: planned.append(plan(*args)) or planned[-1])
    runs = {}
    for mode, budget in (("fixed", "null"), ("tokens", "200")):
        out = tmp_path / mode
        cfg = tiny_config("online_dpo_single_device", tiny_setup, out, "gradient_accumulation_steps=2",
                          f"max_micro_batch_tokens={budget}", "optimizer._component_=torch.optim.SGD",
                          "optimizer.lr=0.5", "lr_scheduler.num_warmup_steps=0")  # fmt: skip
        run("online_dpo_single_device", cfg, tmp_path / "pg")
        runs[mode] = (load_file(out / "step_2" / "adapter" / "adapter_model.safetensors"), logged(cfg))
    sizes = [sorted(map(len, micro_batches)) for micro_batches in planned]
    assert sizes[:2] == [[4, 4], [4, 4]] and all(len(set(s)) > 1 for s in sizes[2:]), sizes  # the split is uneven
    (fixed, fixed_log), (tokens, tokens_log) = runs["fixed"], runs["tokens"]
    assert fixed.keys() == tokens.keys()
    start = next(iter(fixed))
    assert not torch.equal(fixed[start], torch.zeros_like(fixed[start]))
    for key in fixed:
        torch.testing.assert_close(tokens[key], fixed[key], rtol=1e-4, atol=1e-6, msg=key)
    for step in (1, 2):
        assert tokens_log[step]["loss"] == pytest.approx(fixed_log[step]["loss"], rel=1e-4)
