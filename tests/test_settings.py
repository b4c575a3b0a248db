"""One settings parser for every recipe: the same mistake gets the same message in all four, and the FSDP2
checkpoint writer hashes each file once."""

import pytest
from conftest import recipe_config, run_distributed_in_process
from test_full_dpo_distributed import overrides

from dpo_components.checkpointing import directory
from dpo_components.settings import ConfigError, RecipeSettings
from recipes.full_dpo_distributed import FullDPORecipeDistributed
from recipes.ipo_single_device import IPORecipeSingleDevice
from recipes.lora_dpo_distributed import LoRADPORecipeDistributed
from recipes.lora_dpo_single_device import LoRADPORecipeSingleDevice

RECIPES = {
    "lora_dpo_single_device": LoRADPORecipeSingleDevice,
    "ipo_single_device": IPORecipeSingleDevice,
    "full_dpo_distributed": FullDPORecipeDistributed,
    "lora_dpo_distributed": LoRADPORecipeDistributed,
}
MISTAKES = [
    ({"reference.mode": "live"}, r"reference.mode must be one of \('model', 'precomputed'\), got 'live'"),
    ({"prefix_sharing_attention": "xformers"}, r"prefix_sharing_attention must be one of \('flex', 'sdpa'\)"),
    ({"group_by_length": "true", "shuffle": "false"}, "group_by_length: true needs shuffle: true"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be >= 1, got 0"),
    ({"save_every_n_steps": 0}, r"save_every_n_steps must be a whole number >= 1 or null"),
    ({"dtype": "fp16"}, "dtype fp16 is not supported"),
]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("mistake,message", MISTAKES, ids=lambda m: str(m)[:40])
def test_every_recipe_gives_the_same_message_for_the_same_mistake(recipe, mistake, message, one_rank_group):
    cfg = recipe_config(f"recipe_configs/tiny/{recipe}.yaml", [f"{k}={v}" for k, v in mistake.items()])
    with pytest.raises(ConfigError, match=message):
        RECIPES[recipe](cfg)


@pytest.mark.parametrize("recipe", ["lora_dpo_single_device", "lora_dpo_distributed"])
def test_lora_recipes_refuse_a_reference_checkpointer_instead_of_ignoring_it(recipe, one_rank_group):
    args = ["reference.checkpointer._component_=torchtune.training.FullModelHFCheckpointer",
            "reference.checkpointer.checkpoint_dir=/somewhere"]  # fmt: skip
    with pytest.raises(ConfigError, match="reference.checkpointer is not supported by this recipe.*ipo_single_device"):
        RECIPES[recipe](recipe_config(f"recipe_configs/tiny/{recipe}.yaml", args))
    ipo = recipe_config("recipe_configs/tiny/ipo_single_device.yaml", args)  # the IPO recipe takes one
    assert RecipeSettings.from_config(ipo).reference.checkpointer.checkpoint_dir == "/somewhere"


def test_shared_keys_have_one_default():
    cfg = recipe_config("recipe_configs/tiny/lora_dpo_single_device.yaml",
                        ["~logprob_chunk_size", "~shuffle", "~reference", "~pad_to_multiple_of"])  # fmt: skip
    settings = RecipeSettings.from_config(cfg)
    assert (settings.logprob_chunk_size, settings.shuffle, settings.pad_to_multiple_of) == (256, True, 1)
    assert settings.reference.mode == "model" and settings.reference.batch_size == cfg.batch_size
    assert settings.reference.cache_dir == settings.output_dir / "reference_cache"


def test_sharded_checkpoint_hashes_each_file_once(tiny_setup, tmp_path, monkeypatch):
    """A consolidated FSDP2 save writes the HF weights straight into step_<N> and its one manifest reads each file
    once (before, a manifest of the HF part was written, moved and overwritten: the weights were hashed twice)."""
    hashed = []
    real = directory.file_digest
    monkeypatch.setattr(directory, "file_digest", lambda path: hashed.append(path.name) or real(path))
    out = tmp_path / "out"
    cfg = recipe_config("recipe_configs/tiny/full_dpo_distributed.yaml",
                        overrides(tiny_setup, out, max_steps_per_epoch=1, eval_dataset="null"))  # fmt: skip
    run_distributed_in_process(FullDPORecipeDistributed, cfg, tmp_path / "scratch")
    written = sorted(p.name for p in (out / "step_1").rglob("*") if p.is_file() and p.name != "manifest.json")
    assert "model-00001-of-00001.safetensors" in written and "recipe_state.pt" in written
    saved = [name for name in hashed if name != "model.safetensors"]  # the base checkpoint is hashed at setup
    assert sorted(saved) == written  # every file of the checkpoint, each once
