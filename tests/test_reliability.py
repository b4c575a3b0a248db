"""Nothing silently wrong at setup: step counts, rows longer than the model, leftovers of killed saves, and a
reference cache keyed by every byte of the checkpoint."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from dpo_components import synthetic
from dpo_components.losses import IPOLoss, SPPOHardLoss
from dpo_components.reference import reference_cache_key
from recipes.ipo_single_device import IPORecipeSingleDevice
from recipes.lora_dpo_single_device import ConfigError, LoRADPORecipeSingleDevice


@pytest.mark.parametrize(
    "key,value",
    [("log_every_n_steps", 0), ("log_every_n_steps", None), ("max_steps_per_epoch", 0), ("save_every_n_steps", -1),
     ("eval_every_n_steps", 0), ("save_every_n_steps", 2.5)],
)  # fmt: skip
def test_step_counts_are_refused_at_setup(recipe_cfg, key, value):
    cfg = recipe_cfg(**{key: value})
    with pytest.raises(ConfigError, match=rf"{key} must be a whole number >= 1"):
        LoRADPORecipeSingleDevice(cfg)


def test_ipo_beta_whose_target_overflows_is_refused(recipe_cfg):
    for loss in (IPOLoss, SPPOHardLoss):
        with pytest.raises(ValueError, match=r"beta=1e-45 makes the target 1/\(2 beta\) = 5e\+44 overflow float32"):
            loss(beta=1e-45)
    cfg = recipe_cfg("recipe_configs/tiny/ipo_single_device.yaml", **{"loss.beta": 1e-45})
    with pytest.raises(ConfigError, match="overflow float32"):
        IPORecipeSingleDevice(cfg).setup(cfg)


def test_rows_longer_than_the_model_are_named_at_setup(recipe_cfg, tiny_setup, tmp_path):
    rows = synthetic.preference_pairs(40, seed=5)
    rows[3]["rejected"] = "a ."
    rows[3]["chosen"] = "a ."  # a bad row, skipped: the dataset's pair 20 is then the file's row 21
    rows[21]["chosen"] = " ".join(["the film was great and the cast was superb ."] * 60)  # > 512 tokens
    path = synthetic.write_jsonl(rows, tmp_path / "long.jsonl")
    cfg = recipe_cfg(**{"dataset.data_files": str(path), "dataset.max_length": 1024, "dataset.on_bad_row": "skip"})
    with pytest.raises(ValueError, match=r"dataset: pair 20 \(.*long.jsonl \(split 'train'\) row 21\) needs \d+ "
                                         r"tokens .* more than the model's max_seq_len 512"):  # fmt: skip
        LoRADPORecipeSingleDevice(cfg).setup(cfg)


def test_leftovers_of_killed_saves_are_removed_at_start(recipe_cfg):
    cfg = recipe_cfg(max_steps_per_epoch=1, eval_dataset=None)
    out = cfg.output_dir
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        stale = [f"{out}/.step_3.tmp-{dead.stdout.strip()}", f"{out}/.step_5.tmp"]  # a killed save; distributed
        alive = f"{out}/.step_7.tmp-{sleeper.pid}"  # a save in progress in another process
        for path in [*stale, alive]:
            os.makedirs(path)
            open(f"{path}/model.safetensors", "wb").close()
        recipe = LoRADPORecipeSingleDevice(cfg)
        recipe.setup(cfg)
        assert not any(os.path.exists(p) for p in stale) and os.path.exists(alive)
    finally:
        sleeper.kill()


def test_reference_cache_key_covers_every_byte_of_the_checkpoint(tmp_path, tokenizer):
    from dpo_components.data import tokenize_rows

    data = tokenize_rows(synthetic.preference_pairs(4, seed=0), tokenizer, source="rows", max_length=96)
    tensors = {f"layer{i}": torch.randn(256, 1024, generator=torch.Generator().manual_seed(i)) for i in range(6)}
    save_file(tensors, tmp_path / "model.safetensors")  # 6 MiB: the middle is outside the first and last MiB
    key = lambda: reference_cache_key(data, tmp_path, ["model.safetensors"], torch.float32)
    before = key()
    tensors["layer3"] = tensors["layer3"] * 1.5  # same size, middle of the file
    save_file(tensors, tmp_path / "model.safetensors")
    assert key() != before
    assert json.dumps(before) and key() == key()  # and stable for the same bytes
