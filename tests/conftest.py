import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # our recipes/ before the `recipes` package torchtune's wheel installs

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from dpo_components.tiny.tokenizer import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    """A small SFT'd tiny model and synthetic preference data (about 10 s), shared by the recipe tests."""
    from dpo_components.tiny.prepare import prepare_tiny

    return prepare_tiny(
        tmp_path_factory.mktemp("tiny"), sft_steps=60, sft_examples=2000, train_pairs=256, eval_pairs=64
    )


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """``tiny_family(name)``: the tiny checkpoint of a model family in its Hugging Face layout, with its tokenizer
    files (dpo_components.tiny.families; about a second each, written once per session)."""
    from dpo_components.tiny.families import write_tiny_checkpoint

    written = {}

    def get(family):
        if family not in written and family == "llama3_2_vision":  # a checkpoint that sees images, and pairs with them
            from dpo_components.tiny.shapes_task import prepare_shapes_task

            written[family] = prepare_shapes_task(tmp_path_factory.mktemp(family), train_pairs=16, eval_pairs=16,
                                                  caption_steps=40, caption_batch_size=4)  # fmt: skip
        elif family not in written:
            written[family] = write_tiny_checkpoint(tmp_path_factory.mktemp(family), family)
        return written[family]

    return get


@pytest.fixture
def recipe_cfg(tiny_setup, tmp_path):
    """The tiny LoRA DPO config pointed at ``tiny_setup``, writing to a fresh output dir; merge overrides."""
    from omegaconf import OmegaConf

    def make(config="recipe_configs/tiny/lora_dpo_single_device.yaml", **overrides):
        cfg = OmegaConf.load(REPO_ROOT / config)
        base = {
            "output_dir": str(tmp_path / "out"),
            "checkpointer": {"checkpoint_dir": str(tiny_setup / "sft_model")},
            "dataset": {"data_files": str(tiny_setup / "data/train.jsonl")},
            "eval_dataset": {"data_files": str(tiny_setup / "data/eval.jsonl")},
            "epochs": 1,
            "log_every_n_steps": 1,
            "eval_every_n_steps": None,
            "save_every_n_steps": None,
            "eval_samples": 0,  # tests that check samples turn them on
            "prepare": None,  # inputs are tiny_setup's; a test of a missing path must not build outputs/tiny (2 min)
        }
        if config == "recipe_configs/tiny/lora_dpo_single_device.yaml":
            # the settings the LoRA recipe tests were written for (the shipped config tunes the demo: beta 5, batch 32)
            base.update(batch_size=16, loss={"beta": 0.1}, optimizer={"lr": 3e-3})
            base["lr_scheduler"] = {"num_warmup_steps": 10}
        cfg = OmegaConf.merge(
            cfg, base, OmegaConf.from_dotlist([f"{k}={'null' if v is None else v}" for k, v in overrides.items()])
        )
        return cfg

    return make


def run_distributed_in_process(recipe_class, cfg, scratch: Path):
    """Run an FSDP2 recipe in this process as a 1-rank gloo group: the recipe's own code, without torchrun's two
    interpreter start-ups (about 10 s each here). Tests of what 2 ranks do launch torchrun instead."""
    import torch.distributed as dist

    scratch.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo", init_method=f"file://{scratch / 'process_group'}", rank=0, world_size=1)
    try:
        recipe = recipe_class(cfg)
        recipe.setup(cfg)
        recipe.train()
        recipe.cleanup()
    finally:
        dist.destroy_process_group()
    return recipe


def recipe_config(path: str, args: list[str]):
    """The config ``tune run`` would build from the YAML at ``path`` and its key=value (and ~key) arguments."""
    from argparse import Namespace

    from omegaconf import OmegaConf
    from torchtune.config._utils import _merge_yaml_and_cli_args

    yaml = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / path))
    return _merge_yaml_and_cli_args(Namespace(**yaml), [str(arg) for arg in args])


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-rank gloo group, so the FSDP2 recipes' constructors run in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def pytest_collection_modifyitems(items):
    """Every test under tests/recipes/ runs a recipe: marked ``recipe`` (``pytest -m "not recipe"`` leaves them
    out); component tests that train through a recipe carry the mark themselves."""
    for item in items:
        if item.path.parent.name == "recipes":
            item.add_marker(pytest.mark.recipe)
