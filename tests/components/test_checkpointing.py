"""dpo_components.checkpointing without a recipe: the resume state goes out and comes back identically, the manifest
names the first damaged file, resume takes the newest complete checkpoint, a resume refuses other settings; and
one FSDP2 save hashing each file once."""

import pytest
import torch
from conftest import recipe_config, run_distributed_in_process
from helpers import overrides

from dpo_components import files
from dpo_components.checkpointing import (
    RECIPE_STATE_FILE,
    check_same_run,
    checkpoint_problem,
    latest_checkpoint,
    restore_training_state,
    training_state,
    write_manifest,
)
from dpo_components.settings import ConfigError
from recipes.full_dpo_distributed import FullDPORecipeDistributed


def optimizer_and_schedule(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return model, optimizer, schedule


def test_the_resume_state_comes_back_identically(tmp_path):
    model, optimizer, schedule = optimizer_and_schedule(0)
    for _ in range(2):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        schedule.step()
    progress = {"global_step": 2, "epochs_run": 0, "batches_done_in_epoch": 4}
    torch.save(training_state(progress, optimizer, schedule, {"seed": 0}), tmp_path / RECIPE_STATE_FILE)
    write_manifest(tmp_path, run={"seed": 0})
    expected_draw = torch.rand(3)  # the RNG right after the save

    fresh_model, fresh_optimizer, fresh_schedule = optimizer_and_schedule(1)
    restored = restore_training_state(tmp_path, fresh_optimizer, fresh_schedule, {"seed": 0})
    assert restored == progress
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG is where the save left it
    assert fresh_schedule.state_dict() == schedule.state_dict()
    saved, loaded = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    for key in saved:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved[key][name], loaded[key][name])


def test_a_resume_with_other_settings_is_refused_naming_each_key(tmp_path):
    check_same_run(tmp_path, {"seed": 0, "loss.beta": 0.1}, {"seed": 0, "loss.beta": 0.1})
    with pytest.raises(ConfigError, match="loss.beta"):
        check_same_run(tmp_path, {"seed": 0, "loss.beta": 0.1}, {"seed": 0, "loss.beta": 0.5})


def write_checkpoint(path, payload=b"weights"):
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(payload)
    (path / RECIPE_STATE_FILE).write_bytes(b"state")
    write_manifest(path)


def test_the_manifest_names_the_first_damaged_file_and_resume_skips_it(tmp_path):
    write_checkpoint(tmp_path / "step_1")
    write_checkpoint(tmp_path / "step_2")
    assert checkpoint_problem(tmp_path / "step_2") is None
    assert latest_checkpoint(tmp_path) == tmp_path / "step_2"
    (tmp_path / "step_2" / "model.safetensors").write_bytes(b"weighTs")  # same size, one byte changed
    assert checkpoint_problem(tmp_path / "step_2") == ("model.safetensors does not match its hash in the manifest "
                                                       "(changed after it was written)")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_1"
    (tmp_path / "step_1" / "model.safetensors").write_bytes(b"weight")
    assert "model.safetensors has 6 bytes, the manifest says 7" == checkpoint_problem(tmp_path / "step_1")
    (tmp_path / "step_1" / "manifest.json").unlink()
    assert "no manifest.json" in checkpoint_problem(tmp_path / "step_1")
    assert latest_checkpoint(tmp_path) is None


@pytest.mark.recipe
def test_sharded_checkpoint_hashes_each_file_once(tiny_setup, tmp_path, monkeypatch):
    """A consolidated FSDP2 save writes the HF weights straight into step_<N> and its one manifest reads each file
    once (before, a manifest of the HF part was written, moved and overwritten: the weights were hashed twice)."""
    hashed = []
    real = files.file_digest
    monkeypatch.setattr(files, "file_digest", lambda path: hashed.append(path.name) or real(path))
    out = tmp_path / "out"
    cfg = recipe_config("recipe_configs/tiny/full_dpo_distributed.yaml",
                        overrides(tiny_setup, out, max_steps_per_epoch=1, eval_dataset="null"))  # fmt: skip
    run_distributed_in_process(FullDPORecipeDistributed, cfg, tmp_path / "scratch")
    written = sorted(p.name for p in (out / "step_1").rglob("*") if p.is_file() and p.name != "manifest.json")
    assert "model-00001-of-00001.safetensors" in written and "recipe_state.pt" in written
    saved = [name for name in hashed if name != "model.safetensors"]  # the base checkpoint is hashed at setup
    assert sorted(saved) == written  # every file of the checkpoint, each once
