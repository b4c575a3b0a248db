"""The IPO recipe: full-parameter and LoRA, live vs precomputed reference, margin vs target, cache, resume."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from helpers import logged
from helpers import run_ipo_recipe as run
from omegaconf import OmegaConf
from safetensors.torch import load_file

from dpo_components.settings import ConfigError
from dpo_components.tiny.model import save_hf_checkpoint, tiny_llama
from recipes.ipo_single_device import IPORecipeSingleDevice

CONFIG = "recipe_configs/tiny/ipo_single_device.yaml"



def test_margin_approaches_the_target_and_accuracy_rises(recipe_cfg):
    cfg = recipe_cfg(CONFIG, epochs=3, eval_every_n_steps=16, **{"optimizer.lr": 6e-4})
    recipe = IPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    before = recipe.evaluate()
    recipe.train()
    rows = logged(cfg)
    evals = [rows[step] for step in sorted(rows) if "eval/ipo/margin" in rows[step]]
    target = before["eval/ipo/target"]
    assert target == 1.0 and before["eval/ipo/margin"] == 0.0 and before["eval/rewards/accuracies"] == 0.5
    gaps = [abs(e["eval/ipo/margin"] - target) for e in evals]
    assert gaps[-1] < 0.6 * gaps[0] and evals[-1]["eval/ipo/margin"] > 0.4  # moving towards 1/(2 tau)
    assert evals[-1]["eval/rewards/accuracies"] > 0.75
    assert rows[max(rows)]["eval/loss"] < before["eval/loss"]


def test_precomputed_reference_matches_live_reference(recipe_cfg, tmp_path):
    settings = {"max_steps_per_epoch": 3, "epochs": 1, "eval_dataset": None}
    live = recipe_cfg(CONFIG, **settings, **{"reference.mode": "model"})
    cached = recipe_cfg(CONFIG, **settings, output_dir=str(tmp_path / "cached"))
    live_recipe, cached_recipe = run(live), run(cached)
    assert cached_recipe._reference.model is None  # no reference weights kept
    for step in (1, 2, 3):
        assert logged(cached)[step]["loss"] == pytest.approx(logged(live)[step]["loss"], rel=1e-5)
    for (name, a), b in zip(live_recipe._model.named_parameters(), cached_recipe._model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_reference_cache_is_reused_and_keyed(recipe_cfg, tmp_path, caplog, monkeypatch):
    cache_dir = tmp_path / "cache"
    settings = {"max_steps_per_epoch": 1, "epochs": 1, "eval_dataset": None, "reference.cache_dir": str(cache_dir)}
    run(recipe_cfg(CONFIG, **settings), train=False)
    first = sorted(cache_dir.iterdir())
    assert [p.suffix for p in first] == [".json", ".safetensors"]  # the cache and its manifest
    caplog.clear()
    with monkeypatch.context() as patch:  # a cache hit must not even build the reference model
        patch.setattr(IPORecipeSingleDevice, "_frozen_copy", lambda *a: pytest.fail("built a reference copy"))
        run(recipe_cfg(CONFIG, **settings, output_dir=str(tmp_path / "again")), train=False)
    assert "reused" in caplog.text and sorted(cache_dir.iterdir()) == first
    run(
        recipe_cfg(
            CONFIG,
            **settings,
            **{"dataset.max_length": 24, "dataset.max_prompt_length": 18},
            output_dir=str(tmp_path / "b"),
        ),
        train=False,
    )
    assert len(list(cache_dir.glob("*.safetensors"))) == 2  # other truncation, other tokens, other key


def _edit_in_place(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 1  # one bit of the last value: same size, a valid file
    path.write_bytes(bytes(data))


def test_a_damaged_reference_cache_is_named_and_recomputed(recipe_cfg, tmp_path, caplog):
    """Issue 45: a cache changed in place (same size) used to be reused ("reused ...", no warning), and 34 of the
    IPO run's 38 weight tensors came out different; a cut one failed with a SafetensorError naming no file. Now
    each is named and recomputed to the same bytes as the first computation (so the run is the undamaged one)."""
    cache_dir = tmp_path / "cache"
    settings = {"max_steps_per_epoch": 1, "epochs": 1, "eval_dataset": None, "reference.cache_dir": str(cache_dir)}
    run(recipe_cfg(CONFIG, **settings), train=False)
    (cache,) = cache_dir.glob("*.safetensors")
    clean = cache.read_bytes()
    damages = {"does not match its hash in the manifest": lambda: _edit_in_place(cache),
               f"has {len(clean) // 2} bytes, the manifest says {len(clean)}":
                   lambda: cache.write_bytes(clean[: len(clean) // 2]),
               "it has no manifest": lambda: cache.with_suffix(".manifest.json").unlink()}  # a kill between the two
    for why, damage in damages.items():
        damage()
        caplog.clear()
        recipe = run(recipe_cfg(CONFIG, **settings, output_dir=str(tmp_path / "again"), overwrite_output_dir=True),
                     train=False)  # fmt: skip
        assert f"reference cache {cache}: " in caplog.text and why in caplog.text, caplog.text
        assert "recomputing it" in caplog.text and "computed" in caplog.text
        assert cache.read_bytes() == clean
        assert torch.equal(recipe._reference.cache["train"]["chosen_logps"], load_file(cache)["chosen_logps"])


def test_kill_9_during_the_reference_pass_then_the_same_cache(recipe_cfg, tmp_path):
    """A run killed while it precomputes the reference leaves no cache to trust; the next run computes it whole."""
    settings = {"max_steps_per_epoch": 1, "epochs": 1, "eval_dataset": None}
    clean_dir, killed_dir = tmp_path / "clean", tmp_path / "killed"
    run(recipe_cfg(CONFIG, **settings, **{"reference.cache_dir": str(clean_dir)}), train=False)
    cfg = recipe_cfg(CONFIG, **settings, **{"reference.cache_dir": str(killed_dir)}, output_dir=str(tmp_path / "o"))
    OmegaConf.save(cfg, tmp_path / "run.yaml")
    process = subprocess.Popen([sys.executable, "recipes/ipo_single_device.py", "--config", str(tmp_path / "run.yaml")],
                               cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
    seen = b""
    while b"reference log-probs:" not in seen:  # tqdm's bar of the pass
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, seen.decode()[-3000:]
        seen += chunk
    process.kill()
    process.wait()
    assert not list(killed_dir.glob("*.manifest.json"))  # nothing trusted was left
    run(cfg, train=False)
    (clean,), (again,) = clean_dir.glob("*.safetensors"), killed_dir.glob("*.safetensors")
    assert again.read_bytes() == clean.read_bytes()


def test_separate_reference_checkpoint(recipe_cfg, tmp_path):
    torch.manual_seed(1)
    other = save_hf_checkpoint(tiny_llama(), tmp_path / "other_reference")
    cfg = recipe_cfg(CONFIG, max_steps_per_epoch=1, epochs=1, eval_dataset=None)
    cfg.reference.checkpointer = {**cfg.checkpointer, "checkpoint_dir": str(other)}
    run(cfg)
    assert logged(cfg)[1]["ipo/margin"] != 0.0  # the policy (SFT model) differs from this reference


def test_lora_mode_with_precomputed_reference(recipe_cfg):
    cfg = recipe_cfg(
        CONFIG,
        max_steps_per_epoch=2,
        epochs=1,
        eval_dataset=None,
        **{
            "model._component_": "dpo_components.tiny.model.lora_tiny_llama",
            "model.lora_attn_modules": "[q_proj,v_proj]",
            "model.lora_rank": 8,
            "model.lora_alpha": 16,
            "optimizer.lr": 3e-3,
        },
    )
    recipe = run(cfg)
    assert recipe._is_lora and recipe._reference.model is None
    step = REPO_ROOT / cfg.output_dir / "step_2"
    assert (step / "adapter/adapter_model.safetensors").exists()
    assert (step / "model-00001-of-00001.safetensors").exists()


def test_full_parameter_resume_equals_uninterrupted_run(recipe_cfg):
    settings = {
        "max_steps_per_epoch": 4,
        "epochs": 1,
        "save_every_n_steps": 2,
        "eval_dataset": None,
        "batch_size": 8,
        "lr_scheduler.num_warmup_steps": 1,
    }
    full = recipe_cfg(CONFIG, **settings)
    run(full)
    full_dir = REPO_ROOT / full.output_dir
    resumed = recipe_cfg(CONFIG, **settings, resume_from_checkpoint=True, output_dir=str(full_dir.parent / "resumed"))
    resumed_dir = REPO_ROOT / resumed.output_dir
    resumed_dir.mkdir()
    shutil.copytree(full_dir / "step_2", resumed_dir / "step_2")
    shutil.copytree(full_dir / "reference_cache", resumed_dir / "reference_cache")
    recipe = run(resumed, train=False)
    assert recipe.progress.global_step == 2
    recipe.train()
    expected = load_file(full_dir / "step_4" / "model-00001-of-00001.safetensors")
    got = load_file(resumed_dir / "step_4" / "model-00001-of-00001.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_torchao_low_bit_optimizer_from_yaml(recipe_cfg):
    cfg = recipe_cfg(
        CONFIG,
        max_steps_per_epoch=3,
        epochs=1,
        eval_dataset=None,
        **{"optimizer._component_": "torchao.optim.AdamW8bit", "lr_scheduler.num_warmup_steps": 1},
    )
    recipe = run(cfg)
    state = recipe._optimizer.state_dict()["state"]
    assert type(next(iter(state.values()))["exp_avg"]).__name__ == "OptimState8bit"
    assert logged(cfg)[3]["loss"] < logged(cfg)[1]["loss"]  # step 1 runs at lr 0 (warmup)


def test_unknown_reference_mode_is_refused(recipe_cfg):
    with pytest.raises(ConfigError, match="reference.mode must be one of"):
        run(recipe_cfg(CONFIG, **{"reference.mode": "cached"}), train=False)


@pytest.mark.parametrize("name", ["DPOLoss", "SimPOLoss", "ORPOLoss", "AOTLoss", "SPPOHardLoss", "DPOPLoss"])
def test_losses_run_in_the_ipo_recipe_with_precomputed_reference(recipe_cfg, name, tmp_path):
    from omegaconf import OmegaConf

    cfg = recipe_cfg(
        CONFIG,
        max_steps_per_epoch=2,
        epochs=1,
        eval_dataset=None,
        batch_size=4,
        **{"reference.cache_dir": str(tmp_path / "cache")},
    )
    cfg.loss = OmegaConf.create({"_component_": f"dpo_components.losses.{name}"})
    recipe = run(cfg)
    assert recipe.progress.global_step == 2
    assert (tmp_path / "cache").exists() == recipe._loss_fn.needs_reference  # no reference pass when not needed
