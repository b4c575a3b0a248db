"""Quantized-training variants (from the CPU sweep file) each build and take a step; the sweep runner's report."""

import json

import pytest
import torch
from conftest import REPO_ROOT
from omegaconf import OmegaConf
from safetensors.torch import load_file

from dpo_components.models.quantization import float8, requirement_met
from dpo_components.settings import ConfigError
from dpo_components.tiny.model import tiny_llama
from dpo_components.tools import experiments
from recipes.ipo_single_device import IPORecipeSingleDevice
from recipes.lora_dpo_single_device import LoRADPORecipeSingleDevice

SWEEP = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "recipe_configs/experiments/quant_sweep.yaml"))
RECIPES = {"recipes/lora_dpo_single_device.py": LoRADPORecipeSingleDevice,
           "recipes/ipo_single_device.py": IPORecipeSingleDevice}  # fmt: skip


def variant(spec):
    defaults = SWEEP["defaults"]
    return {**defaults, **spec, "overrides": {**defaults["overrides"], **spec.get("overrides", {})}}


@pytest.mark.recipe
@pytest.mark.parametrize("spec", SWEEP["variants"], ids=lambda s: s["name"])
def test_every_sweep_variant_builds_and_takes_a_step(spec, recipe_cfg):
    v = variant(spec)
    ok, reason = requirement_met(v.get("requires"))
    if not ok:
        pytest.skip(reason)
    overrides = {**v["overrides"], "max_steps_per_epoch": 1, "eval_dataset": None, "batch_size": 4}
    cfg = recipe_cfg(v["config"], **overrides)
    recipe = RECIPES[v["recipe"]](cfg)
    recipe.setup(cfg)
    recipe.train()
    assert recipe.progress.global_step == 1
    if "model_transform._component_" in overrides:
        q_proj = recipe._model.layers[0].attn.q_proj
        assert "Int8" in type(q_proj).__name__ + type(q_proj.weight).__name__
        saved = load_file(REPO_ROOT / cfg.output_dir / "step_1" / "model-00001-of-00001.safetensors")
        tiny = tiny_llama()  # the int8 training subclasses were saved as plain tensors in HF layout
        from torchtune.models.convert_weights import hf_to_tune

        tiny.load_state_dict(hf_to_tune(saved, num_heads=4, num_kv_heads=2, dim=256), strict=True)


@pytest.mark.recipe
def test_model_transform_is_refused_for_lora(recipe_cfg):
    cfg = recipe_cfg(
        "recipe_configs/tiny/ipo_single_device.yaml",
        **{
            "model._component_": "dpo_components.tiny.model.lora_tiny_llama",
            "model.lora_rank": 8,
            "model.lora_alpha": 16,
            "model.lora_attn_modules": "[q_proj]",
            "model_transform._component_": "dpo_components.models.quantization.int8_mixed_precision",
        },
    )
    with pytest.raises(ConfigError, match="full-parameter training only"):
        IPORecipeSingleDevice(cfg).setup(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_float8_without_a_capable_gpu_says_why():
    with pytest.raises(ConfigError, match="float8 training is not available: needs a CUDA GPU"):
        float8(tiny_llama())


def test_sweep_runner_writes_results_with_deltas_and_skips(tiny_setup, tmp_path):
    sweep = {
        "title": "mini sweep",
        "output_dir": str(tmp_path / "sweep"),
        "defaults": {"recipe": "recipes/lora_dpo_single_device.py",
                     "config": "recipe_configs/tiny/lora_dpo_single_device.yaml",
                     "overrides": {"epochs": 1, "max_steps_per_epoch": 3, "eval_every_n_steps": None,
                                   "save_every_n_steps": None, "log_every_n_steps": 1, "batch_size": 4,
                                   "checkpointer.checkpoint_dir": str(tiny_setup / "sft_model"),
                                   "dataset.data_files": str(tiny_setup / "data/train.jsonl"),
                                   "dataset.split": "train[:12]", "eval_dataset.split": "train[:16]",
                                   "eval_dataset.data_files": str(tiny_setup / "data/eval.jsonl")}},
        "variants": [{"name": "fp32", "baseline": True}, {"name": "bf16", "overrides": {"dtype": "bf16"}},
                     {"name": "needs sm89", "requires": "sm89"}],
    }  # fmt: skip
    path = tmp_path / "sweep.yaml"
    OmegaConf.save(OmegaConf.create(sweep), path)
    out = experiments.run_sweep(path, repo_root=REPO_ROOT, jobs=2)  # two at a time; results in sweep order
    results = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in results[:2]] == ["ok", "ok"]
    if not torch.cuda.is_available():
        assert results[2]["status"].startswith("skipped: needs a CUDA GPU")
    assert 0 <= results[1]["eval_accuracy"] <= 1 and results[1]["peak_memory_gib"] > 0
    assert results[1]["delta_train_loss"] == pytest.approx(results[1]["train_loss"] - results[0]["train_loss"])
    table = (out / "results.md").read_text()
    assert "| fp32 (baseline) |" in table and "| needs sm89 |" in table and "skipped" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_int8_mixed_precision_really_runs_int8_matmuls():
    """Outputs must differ from fp32 (quantisation error) but stay close, and gradients must flow."""
    import copy

    from dpo_components.models.quantization import int8_mixed_precision

    torch.manual_seed(0)
    model = tiny_llama()
    quantized = int8_mixed_precision(copy.deepcopy(model))
    tokens = torch.randint(0, 512, (2, 16))
    reference, out = model(tokens), quantized(tokens)
    error = (reference - out).abs().max().item()
    assert 0 < error < 0.1 * reference.abs().max().item()
    out.sum().backward()
    assert quantized.layers[0].attn.q_proj.weight.grad is not None
