"""Nothing silently wrong at setup: step counts, rows longer than the model, leftovers of killed saves, and a
reference cache keyed by every byte of the checkpoint."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from dpo_components.checkpointing import CheckpointError, checkpoint_problem
from dpo_components.losses import IPOLoss, SPPOHardLoss
from dpo_components.settings import ConfigError
from dpo_components.tiny import synthetic
from recipes.ipo_single_device import IPORecipeSingleDevice
from recipes.lora_dpo_single_device import LoRADPORecipeSingleDevice


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


# ----------------------------------------------------------------------- a run owns its output_dir; resume checks


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints(recipe_cfg):
    """Case 2 of issue 14: a fresh run into a directory holding step_36 of another run used to start silently, and a
    resume after a kill then continued from the old run's step_36."""
    cfg = recipe_cfg(max_steps_per_epoch=1, eval_dataset=None)
    old = Path(cfg.output_dir) / "step_36"
    old.mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"holds checkpoints of an earlier run \(step_36\).*overwrite_output_dir"):
        LoRADPORecipeSingleDevice(cfg).setup(cfg)
    cfg.overwrite_output_dir = True
    LoRADPORecipeSingleDevice(cfg).setup(cfg)
    assert not old.exists()


def _swapped_pairs(path: Path, out: Path) -> Path:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return synthetic.write_jsonl([{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows], out)


def _edited_checkpoint(source: Path, out: Path) -> Path:
    shutil.copytree(source, out)
    tensors = load_file(out / "model.safetensors")
    name = sorted(tensors)[len(tensors) // 2]  # a tensor in the middle of the file; same size
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_resume_refuses_a_run_trained_with_other_settings(recipe_cfg, tiny_setup, tmp_path):
    """Case 4: another base checkpoint, swapped pairs of the same size, another max_length, lr or epochs all resumed
    silently; each is now refused, naming the key and both values."""
    settings = {"max_steps_per_epoch": 1, "eval_dataset": None}
    cfg = recipe_cfg(**settings)
    recipe = LoRADPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    changes = {
        "optimizer.lr": (0.001, r"optimizer.lr: 0.003 in the checkpoint, 0.001 now"),
        "epochs": (2, r"epochs: 1 in the checkpoint, 2 now"),
        "dataset.max_length": (80, r"dataset.max_length: 96 in the checkpoint, 80 now"),
        "dataset.data_files": (_swapped_pairs(tiny_setup / "data/train.jsonl", tmp_path / "swapped.jsonl"),
                               r"train_data: '[0-9a-f]{64}' in the checkpoint, '[0-9a-f]{64}' now"),
        "checkpointer.checkpoint_dir": (_edited_checkpoint(tiny_setup / "sft_model", tmp_path / "edited"),
                                        r"base_checkpoint: '[0-9a-f]{32}' in the checkpoint, '[0-9a-f]{32}' now"),
    }  # fmt: skip
    for key, (value, message) in changes.items():
        changed = recipe_cfg(**settings, resume_from_checkpoint=True, **{key: value})
        with pytest.raises(ConfigError, match=rf"cannot resume from .*step_1: .*\n  {message}"):
            LoRADPORecipeSingleDevice(changed).setup(changed)
    same = recipe_cfg(**settings, resume_from_checkpoint=True)
    resumed = LoRADPORecipeSingleDevice(same)
    resumed.setup(same)
    assert resumed.progress.global_step == 1


def test_resume_skips_a_corrupt_checkpoint_and_names_the_bad_file(recipe_cfg, caplog):
    """Case 7: a truncated recipe_state.pt or a deleted adapter file gave a raw traceback naming no checkpoint."""
    settings = {"max_steps_per_epoch": 2, "save_every_n_steps": 1, "eval_dataset": None}
    cfg = recipe_cfg(**settings)
    recipe = LoRADPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    out = Path(cfg.output_dir)
    assert checkpoint_problem(out / "step_1") is None and checkpoint_problem(out / "step_2") is None
    (out / "step_2" / "adapter" / "adapter_model.safetensors").unlink()

    resume = recipe_cfg(**settings, resume_from_checkpoint=True)
    recipe = LoRADPORecipeSingleDevice(resume)
    with caplog.at_level(logging.WARNING):
        recipe.setup(resume)
    assert recipe.progress.global_step == 1
    assert "skipping checkpoint" in caplog.text
    assert "step_2: adapter/adapter_model.safetensors is missing" in caplog.text

    state = out / "step_1" / "recipe_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated, as by a disk that filled up outside our save
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* is complete:\n  step_2: adapter/adapter_model."
                                              r"safetensors is missing\n  step_1: recipe_state.pt has 100 bytes, the "
                                              r"manifest says \d+"):  # fmt: skip
        LoRADPORecipeSingleDevice(resume).setup(resume)


FILL_THE_DISK_AFTER_THE_FIRST_SAVE = """
import resource, signal, sys
from omegaconf import OmegaConf
from recipes.lora_dpo_single_device import LoRADPORecipeSingleDevice

cfg = OmegaConf.load(sys.argv[1])
recipe = LoRADPORecipeSingleDevice(cfg)
recipe.setup(cfg)
save = recipe.save_checkpoint

def save_then_fill_the_disk():
    path = save()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))  # no file over 1 MiB any more
    return path

recipe.save_checkpoint = save_then_fill_the_disk
recipe.train()
"""


def test_a_failed_save_names_the_path_and_the_last_good_checkpoint(recipe_cfg, tmp_path):
    """Case 8: a full disk ended a run with a raw SafetensorError. Here files over 1 MiB fail after the first save
    (the tiny model is 13 MB), as on a full disk: the run ends with one message naming the failed checkpoint and
    the last good one, leaves nothing of the failed save, and resumes from the good one once writes work again."""
    settings = {"max_steps_per_epoch": 2, "save_every_n_steps": 1, "eval_dataset": None}
    cfg = recipe_cfg(**settings)
    config_file = tmp_path / "run.yaml"
    OmegaConf.save(cfg, config_file)
    process = subprocess.run([sys.executable, "-c", FILL_THE_DISK_AFTER_THE_FIRST_SAVE, str(config_file)],
                             cwd=REPO_ROOT, capture_output=True, text=True)  # fmt: skip
    out = Path(cfg.output_dir)
    errors = [line for line in process.stderr.splitlines() if "Error" in line and not line.startswith(" ")]
    assert process.returncode != 0 and len(errors) == 1, process.stderr  # one message, no chained traceback
    assert errors[0].startswith(f"dpo_components.checkpointing.CheckpointError: could not write checkpoint {out}/")
    assert errors[0].split()[5] == f"{out}/step_2" and "File too large" in errors[0]
    assert f"the last good checkpoint is {out}/step_1" in errors[0]
    assert not list(out.glob(".step_*")) and not (out / "step_2").exists()
    assert checkpoint_problem(out / "step_1") is None

    resume = recipe_cfg(**settings, resume_from_checkpoint=True)
    recipe = LoRADPORecipeSingleDevice(resume)
    recipe.setup(resume)
    assert recipe.progress.global_step == 1
    recipe.train()
    assert checkpoint_problem(out / "step_2") is None
