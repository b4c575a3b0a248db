"""The single-device LoRA DPO recipe on the tiny model: learning, checkpoints, exact resume, errors, CLI."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from helpers import logged
from helpers import run_lora_recipe as run
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torchtune.training import FullModelHFCheckpointer

from dpo_components.checkpointing import load_peft_adapter
from dpo_components.settings import ConfigError
from dpo_components.tiny.model import TINY_LLAMA_ARGS, lora_tiny_llama, tiny_llama
from recipes.lora_dpo_single_device import LoRADPORecipeSingleDevice


def tokens(seed=0):
    return torch.randint(0, TINY_LLAMA_ARGS["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(seed))


def test_short_run_learns_the_preference(recipe_cfg):
    # beta 0.1 learns too slowly for 16 steps since a response's first word is one token (fewer tokens per response)
    cfg = recipe_cfg(**{"max_steps_per_epoch": 16, "optimizer.lr": 3e-3, "loss.beta": 1.0})
    recipe = LoRADPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    before = recipe.evaluate()
    assert before["eval/rewards/accuracies"] == 0.5 and before["eval/rewards/margins"] == 0.0  # adapters start at 0
    assert before["eval/loss"] == pytest.approx(0.693147, abs=1e-5)
    recipe.train()
    after = recipe.evaluate()
    rows = logged(cfg)
    first, last = rows[1], rows[16]
    assert first["loss"] == pytest.approx(0.6931, abs=2e-3)
    assert last["loss"] < first["loss"] - 0.05
    assert after["eval/rewards/accuracies"] > 0.65 and after["eval/loss"] < 0.65
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "lr",
        "tokens_per_second",
        "peak_memory_gib",
        "grad_norm",
    ):
        assert name in last, name


def test_checkpoint_layout_adapter_and_merged_model(recipe_cfg, tiny_setup):
    cfg = recipe_cfg(**{"max_steps_per_epoch": 3, "optimizer.lr": 1e-2, "model.lora_dropout": 0.0})
    recipe = run(cfg)
    ckpt = REPO_ROOT / cfg.output_dir / "step_3"
    names = {p.name for p in ckpt.iterdir()}
    assert {
        "adapter",
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00001.safetensors",
        "tokenizer.model",
        "tokenizer.json",
        "recipe_state.pt",
    } <= names
    assert "adapter_model.pt" not in names and not list((REPO_ROOT / cfg.output_dir).glob(".step_*"))
    assert "adapter_config.json" not in names  # beside the merged model, transformers + peft would apply it twice

    adapter_config = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 16 and adapter_config["lora_alpha"] == 32 and adapter_config["peft_type"] == "LORA"
    assert set(adapter_config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    peft_keys = load_file(ckpt / "adapter" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in peft_keys

    trained = recipe._model.eval()
    with torch.no_grad():
        expected = trained(tokens())
    # The PEFT adapter loads back into a fresh LoRA model on the base weights with identical outputs.
    base = FullModelHFCheckpointer(
        checkpoint_dir=str(tiny_setup / "sft_model"),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3_2",
        output_dir=str(REPO_ROOT / cfg.output_dir / "x"),
    )
    fresh = lora_tiny_llama(
        ["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True, lora_rank=16, lora_alpha=32
    )
    fresh.load_state_dict(base.load_checkpoint()["model"], strict=False)
    missing, unexpected = fresh.load_state_dict(load_peft_adapter(ckpt, 4, 2, 256), strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(tokens()), expected, rtol=0, atol=0)
    # The merged model is base + LoRA: a plain model loaded from it gives the LoRA model's outputs.
    merged = FullModelHFCheckpointer(
        checkpoint_dir=str(ckpt),
        checkpoint_files=["model-00001-of-00001.safetensors"],
        model_type="LLAMA3_2",
        output_dir=str(REPO_ROOT / cfg.output_dir / "y"),
    )
    plain = tiny_llama()
    plain.load_state_dict(merged.load_checkpoint()["model"], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens()), expected, rtol=1e-4, atol=1e-4)
    # ... and the base weights inside the trained model were not touched by the merge.
    base_weights = base.load_checkpoint()["model"]
    torch.testing.assert_close(trained.layers[0].attn.q_proj.weight, base_weights["layers.0.attn.q_proj.weight"])


SPEEDUPS = {"group_by_length": True, "prefix_sharing": True, "reference.mode": "precomputed"}


@pytest.mark.parametrize("speedups", [{}, SPEEDUPS], ids=["plain", "grouped-shared-cached"])
def test_resume_from_step_k_equals_uninterrupted_run(recipe_cfg, speedups):
    settings = {
        **speedups,
        "max_steps_per_epoch": 6,
        "save_every_n_steps": 3,
        "gradient_accumulation_steps": 2,
        "batch_size": 4,
        "model.lora_dropout": 0.1,
        "optimizer.lr": 3e-3,
        "lr_scheduler.num_warmup_steps": 2,
    }
    full_cfg = recipe_cfg(**settings)
    run(full_cfg)
    full_dir = REPO_ROOT / full_cfg.output_dir

    resumed_cfg = recipe_cfg(**settings, resume_from_checkpoint=True, output_dir=str(full_dir.parent / "resumed"))
    resumed_dir = REPO_ROOT / resumed_cfg.output_dir
    resumed_dir.mkdir()
    shutil.copytree(full_dir / "step_3", resumed_dir / "step_3")  # as if the first run was killed after step 3
    recipe = run(resumed_cfg, train=False)
    assert recipe.progress.global_step == 3
    recipe.train()
    assert min(logged(resumed_cfg)) == 4  # it continued, it did not start over

    for name in ("adapter/adapter_model.safetensors", "model-00001-of-00001.safetensors"):
        expected, got = load_file(full_dir / "step_6" / name), load_file(resumed_dir / "step_6" / name)
        for key in expected:
            assert torch.equal(expected[key], got[key]), (name, key)
    assert logged(resumed_cfg)[6]["lr"] == logged(full_cfg)[6]["lr"]


def test_gradient_accumulation_equals_one_large_batch_and_metrics_average(recipe_cfg, tmp_path):
    one = recipe_cfg(**{"max_steps_per_epoch": 1, "batch_size": 8, "optimizer.lr": 1e-2})
    recipe_one = run(one)
    two = recipe_cfg(
        **{
            "max_steps_per_epoch": 1,
            "batch_size": 4,
            "gradient_accumulation_steps": 2,
            "optimizer.lr": 1e-2,
            "output_dir": str(tmp_path / "ga"),
        }
    )
    recipe_two = run(two)
    for (name, a), b in zip(recipe_one._model.named_parameters(), recipe_two._model.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for name in ("loss", "rewards/accuracies", "logps/chosen"):  # averaged over both micro-batches
        assert logged(one)[1][name] == pytest.approx(logged(two)[1][name], rel=1e-5)


def test_qlora_trains_and_saves_full_precision_merged_model(recipe_cfg):
    # torchtune's warmup schedule gives the first step lr 0, so step 3 is the first to see trained adapters.
    cfg = recipe_cfg(
        **{
            "max_steps_per_epoch": 3,
            "model.quantize_base": True,
            "optimizer.lr": 1e-2,
            "lr_scheduler.num_warmup_steps": 1,
        }
    )
    recipe = run(cfg)
    from torchao.dtypes.nf4tensor import NF4Tensor

    assert isinstance(recipe._model.layers[0].attn.q_proj.weight, NF4Tensor)
    merged = load_file(REPO_ROOT / cfg.output_dir / "step_3" / "model-00001-of-00001.safetensors")
    assert all(t.dtype == torch.float32 for t in merged.values())
    assert logged(cfg)[3]["loss"] < 0.6931


def test_reference_free_loss_skips_the_reference_forward(recipe_cfg):
    cfg = recipe_cfg(max_steps_per_epoch=2, eval_dataset=None)
    cfg.loss = OmegaConf.create({"_component_": "dpo_components.losses.SimPOLoss", "beta": 2.0, "gamma": 0.5})
    recipe = LoRADPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    calls = []
    recipe._model.register_forward_hook(lambda *_: calls.append(1))
    recipe.train()
    assert len(calls) == 2  # one policy forward per step, no reference forward


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"loss._component_": "dpo_components.losses.NoSuchLoss"}, "cannot build loss"),
        (
            {"loss._component_": "torch.nn.MSELoss", "~loss.beta": None, "~loss.label_smoothing": None},
            "loss must be a dpo_components.losses.PreferenceLoss",
        ),
        ({"checkpointer.checkpoint_files": "[missing.safetensors]"}, r"checkpoint_files not found .*missing"),
        ({"checkpointer.checkpoint_dir": "/nonexistent/model"}, "does not exist"),
        ({"eval_dataset": None, "eval_every_n_steps": 5}, "no eval_dataset"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"batch_size": 300}, "fewer than one step"),
        ({"resume_from_checkpoint": True}, "holds no step_<N> checkpoint"),
        ({"dtype": "fp16"}, "fp16 is not supported"),
    ],
)
def test_bad_configs_are_refused_with_a_clear_message(recipe_cfg, overrides, message):
    removals = [k[1:] for k in overrides if k.startswith("~")]
    cfg = recipe_cfg(**{k: v for k, v in overrides.items() if not k.startswith("~")})
    for key in removals:
        parent, _, leaf = key.rpartition(".")
        del cfg[parent][leaf]
    with pytest.raises(ConfigError, match=message):
        run(cfg, train=False)


def test_output_dir_inside_checkpoint_dir_is_refused(recipe_cfg, tiny_setup):
    cfg = recipe_cfg(output_dir=str(tiny_setup / "sft_model" / "out"))
    with pytest.raises(ConfigError, match="must not be inside checkpointer.checkpoint_dir"):
        run(cfg, train=False)


def test_bf16_on_hardware_without_it_is_refused(recipe_cfg, monkeypatch):
    import recipes.lora_dpo_single_device as recipe_module

    # A GPU without bf16 (this machine has none at all, which torchtune's check treats the same way).
    monkeypatch.setattr(recipe_module.utils, "get_device", lambda device: torch.device("cuda"))
    with pytest.raises(RuntimeError, match="bf16 precision was requested but not available on this hardware"):
        run(recipe_cfg(dtype="bf16", device="cuda"), train=False)


def test_resume_refuses_a_different_batch_size(recipe_cfg):
    cfg = recipe_cfg(**{"max_steps_per_epoch": 1, "batch_size": 4})
    run(cfg)
    with pytest.raises(ConfigError, match="cannot resume from .*\n  batch_size: 4 in the checkpoint, 8 now"):
        run(recipe_cfg(**{"max_steps_per_epoch": 1, "batch_size": 8, "resume_from_checkpoint": True}), train=False)


def test_tune_run_and_python_entry_points_from_repo_root(tiny_setup, tmp_path):
    args = [
        "--config",
        "recipe_configs/tiny/lora_dpo_single_device.yaml",
        f"checkpointer.checkpoint_dir={tiny_setup / 'sft_model'}",
        f"dataset.data_files={tiny_setup / 'data/train.jsonl'}",
        f"eval_dataset.data_files={tiny_setup / 'data/eval.jsonl'}",
        "epochs=1",
        "max_steps_per_epoch=1",
        "eval_every_n_steps=null",
        "save_every_n_steps=null",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tune = shutil.which("tune") or pytest.fail("torchtune's `tune` CLI is not on PATH")
    for i, command in enumerate(
        [[tune, "run", "recipes/lora_dpo_single_device.py"], [sys.executable, "recipes/lora_dpo_single_device.py"]]
    ):
        out = tmp_path / f"run{i}"
        result = subprocess.run(
            command + args + [f"output_dir={out}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert (out / "step_1" / "adapter" / "adapter_model.safetensors").exists()


LOSSES = [
    "DPOLoss",
    "RobustDPOLoss",
    "IPOLoss",
    "HingeLoss",
    "SimPOLoss",
    "SigmoidNormLoss",
    "EXOPairLoss",
    "NCAPairLoss",
    "BCOPairLoss",
    "SPPOHardLoss",
    "AOTLoss",
    "APOZeroLoss",
    "APODownLoss",
    "DiscoPOPLoss",
    "DPOPLoss",
    "RDPOLoss",
    "CPOLoss",
    "ORPOLoss",
    "NLLLoss",
]


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_runs_in_the_recipe_from_yaml(recipe_cfg, name):
    cfg = recipe_cfg(max_steps_per_epoch=2, eval_dataset=None, batch_size=4, **{"lr_scheduler.num_warmup_steps": 1})
    cfg.loss = OmegaConf.create({"_component_": f"dpo_components.losses.{name}"})
    recipe = run(cfg)
    assert recipe.progress.global_step == 2 and torch.isfinite(torch.tensor(logged(cfg)[2]["loss"]))


def test_weighted_combination_runs_in_the_recipe(recipe_cfg):
    cfg = recipe_cfg(max_steps_per_epoch=2, eval_dataset=None, batch_size=4)
    cfg.loss = OmegaConf.create(
        {
            "_component_": "dpo_components.losses.WeightedSum",
            "terms": [
                {"weight": 1.0, "loss": {"_component_": "dpo_components.losses.DPOLoss", "beta": 0.1}},
                {"weight": 0.2, "loss": {"_component_": "dpo_components.losses.NLLLoss"}},
            ],
        }
    )
    run(cfg)
    assert {"loss/0_DPOLoss", "loss/1_NLLLoss"} <= set(logged(cfg)[2])


def test_dora_trains_and_its_merged_checkpoint_matches(recipe_cfg):
    cfg = recipe_cfg(
        **{
            "max_steps_per_epoch": 3,
            "model.use_dora": True,
            "optimizer.lr": 1e-2,
            "lr_scheduler.num_warmup_steps": 1,
            "eval_dataset": None,
        }
    )
    recipe = run(cfg)
    ckpt = REPO_ROOT / cfg.output_dir / "step_3"
    assert json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    assert any("lora_magnitude_vector" in k for k in load_file(ckpt / "adapter" / "adapter_model.safetensors"))
    merged = FullModelHFCheckpointer(
        checkpoint_dir=str(ckpt),
        checkpoint_files=["model-00001-of-00001.safetensors"],
        model_type="LLAMA3_2",
        output_dir=str(REPO_ROOT / cfg.output_dir / "y"),
    )
    plain = tiny_llama()
    plain.load_state_dict(merged.load_checkpoint()["model"], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens()), recipe._model.eval()(tokens()), rtol=1e-4, atol=1e-4)
