"""One settings parser for every recipe: the same mistake gets the same message in all five."""

import pytest
from conftest import recipe_config

from dpo_components.settings import ConfigError, RecipeSettings
from recipes.full_dpo_distributed import FullDPORecipeDistributed
from recipes.ipo_single_device import IPORecipeSingleDevice
from recipes.lora_dpo_distributed import LoRADPORecipeDistributed
from recipes.lora_dpo_single_device import LoRADPORecipeSingleDevice
from recipes.online_dpo_single_device import OnlineDPORecipeSingleDevice

RECIPES = {
    "lora_dpo_single_device": LoRADPORecipeSingleDevice,
    "ipo_single_device": IPORecipeSingleDevice,
    "full_dpo_distributed": FullDPORecipeDistributed,
    "lora_dpo_distributed": LoRADPORecipeDistributed,
    "online_dpo_single_device": OnlineDPORecipeSingleDevice,
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
