"""What several test files use: run a single-device recipe in this process, read a run's logged metrics, the
FSDP2 recipes' key=value overrides on the tests' tiny setup, and PEFT's logits against the merged model."""

import pytest
from conftest import REPO_ROOT

from recipes.ipo_single_device import IPORecipeSingleDevice
from recipes.lora_dpo_single_device import LoRADPORecipeSingleDevice

IPO_CONFIG = "recipe_configs/tiny/ipo_single_device.yaml"
KTO_CONFIG = "recipe_configs/tiny/lora_kto_single_device.yaml"


def run_recipe(recipe_class, cfg, train=True):
    """A single-device recipe on ``cfg`` in this process: setup, and (``train``) train and cleanup."""
    recipe = recipe_class(cfg)
    recipe.setup(cfg)
    if train:
        recipe.train()
        recipe.cleanup()
    return recipe


def run_lora_recipe(cfg, train=True):
    return run_recipe(LoRADPORecipeSingleDevice, cfg, train)


def run_ipo_recipe(cfg, train=True):
    return run_recipe(IPORecipeSingleDevice, cfg, train)


def logged(cfg):
    """The metric logger's lines as (step, {name: value}) pairs, merged per step."""
    rows = {}
    for path in (REPO_ROOT / cfg.output_dir / "logs").glob("*.txt"):
        for line in path.read_text().splitlines():
            step, _, rest = line.partition(" | ")
            for item in rest.split():
                name, _, value = item.partition(":")
                rows.setdefault(int(step.split()[-1]), {})[name] = float(value)
    return rows


def overrides(tiny_setup, out, **extra):
    """key=value arguments pointing a tiny FSDP2 config at the tests' tiny setup, writing to ``out``."""
    settings = {
        "checkpointer.checkpoint_dir": tiny_setup / "sft_model",
        "dataset.data_files": tiny_setup / "data/train.jsonl",
        "eval_dataset.data_files": tiny_setup / "data/eval.jsonl",
        "output_dir": out, "eval_every_n_steps": "null", "save_every_n_steps": "null", "log_every_n_steps": 1,
        "lr_scheduler.num_warmup_steps": 0, "optimizer.lr": 1e-3, "eval_samples": 0,
        **extra,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in settings.items()]


def assert_peft_logits_equal(checkpoint_dir, base_dir):
    """The checkpoint's PEFT adapter on the base model in ``peft`` gives the merged model's logits. Returns the PEFT
    model, the token ids and the merged model's logits for further checks."""
    import torch
    import transformers
    from peft import PeftModel
    from peft.tuners.lora import torchao as peft_torchao

    def load(path):
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                 attn_implementation="eager").eval()  # fmt: skip

    # PEFT refuses to run beside torchao < 0.16 (torchtune 0.6.1 needs <= 0.15); no torchao layer is involved here
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(peft_torchao, "is_torchao_available", lambda: False)
        with_adapter = PeftModel.from_pretrained(load(base_dir), checkpoint_dir / "adapter").eval()
        ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = load(checkpoint_dir)(ids).logits
            torch.testing.assert_close(with_adapter(ids).logits, expected, rtol=1e-4, atol=1e-4)
    return with_adapter, ids, expected
