"""The LoRA/QLoRA FSDP2 recipe on CPU with gloo and 2 processes: the same step as 1 process with the global batch,
exact resume, precomputed == live reference, QLoRA's merged output, the adapter in PEFT, and a killed rank."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, recipe_config, run_distributed_in_process
from helpers import assert_peft_logits_equal, logged
from safetensors.torch import load_file
from test_full_dpo_distributed import Cfg, launch, torchrun
from torchao.dtypes.nf4tensor import to_nf4

from dpo_components.checkpointing import load_peft_adapter
from dpo_components.settings import ConfigError
from recipes.lora_dpo_distributed import LoRADPORecipeDistributed

RECIPE = {"recipe": "recipes/lora_dpo_distributed.py", "config": "recipe_configs/tiny/lora_dpo_distributed.yaml"}
MERGED = "model-00001-of-00001.safetensors"
# SGD with momentum: the weights after a step compare the gradients themselves (Adam's first step turns fp32
# reduction-order noise in near-zero gradients into lr-sized differences), and resume must restore the momentum.
SGD = {"optimizer._component_": "torch.optim.SGD", "optimizer.lr": 0.5, "optimizer.momentum": 0.9,
       "~optimizer.weight_decay": None}  # fmt: skip
# micro-batches by tokens: of 1 or 2 pairs here, and in step 3 four on rank 0 but three on rank 1 until they agree
BUDGET = {"max_micro_batch_tokens": 140}


def overrides(tiny_setup, out, **extra):
    settings = {
        "checkpointer.checkpoint_dir": tiny_setup / "sft_model",
        "dataset.data_files": tiny_setup / "data/train.jsonl",
        "eval_dataset": "null", "output_dir": out, "eval_every_n_steps": "null", "save_every_n_steps": "null",
        "log_every_n_steps": 1, "lr_scheduler.num_warmup_steps": 0, "eval_samples": 0, "batch_size": 4,
        **extra,
    }  # fmt: skip
    return [k if v is None else f"{k}={v}" for k, v in settings.items()]


def adapter(out, step):
    return load_file(out / f"step_{step}" / "adapter" / "adapter_model.safetensors")


def assert_same(a, b, **tolerance):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key, **tolerance)


def sbatch(tmp_path, config, args):
    """scripts/slurm_full_dpo.sbatch as SLURM would run it on one node with 2 "GPUs" (CPU processes here): srun and
    scontrol are stand-ins that run the command and name this host."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", 'exec "$@"'), ("scontrol", "echo localhost")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1", "SLURM_NNODES": "1",
           "SLURM_GPUS_PER_NODE": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "4242",
           "RECIPE": RECIPE["recipe"]}  # fmt: skip
    result = subprocess.run(["bash", "scripts/slurm_full_dpo.sbatch", config, *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def unequal_micro_batch_counts(tiny_setup, steps):
    """The steps (1-based) in which the two ranks plan different numbers of micro-batches under BUDGET: the
    recipe's order (seed 0, shuffled) cut into global batches of 8, rank r taking pairs 4r..4r+3 of each."""
    from omegaconf import OmegaConf
    from torchtune import config

    from dpo_components.data.collate import PreferenceCollator
    from dpo_components.data.micro_batches import plan_micro_batches
    from dpo_components.data.order import batch_order

    cfg = OmegaConf.load(REPO_ROOT / RECIPE["config"])
    cfg.dataset.data_files = str(tiny_setup / "data/train.jsonl")
    tokenizer = config.instantiate(cfg.tokenizer)
    data = config.instantiate(cfg.dataset, tokenizer)
    order = batch_order(data, 0, 0, 8, True, False, False)
    collate = PreferenceCollator(tokenizer.pad_id)
    counts = [[len(plan_micro_batches([data[i] for i in order[8 * step + 4 * rank : 8 * step + 4 * rank + 4]], 4,
                                      BUDGET["max_micro_batch_tokens"], collate)) for rank in (0, 1)]
              for step in range(steps)]  # fmt: skip
    return [step + 1 for step, (a, b) in enumerate(counts) if a != b]


@pytest.fixture(scope="module")
def two_ranks(tiny_setup, tmp_path_factory):
    """2 ranks x batch 4 in micro-batches by tokens (BUDGET), SGD, 3 steps, a checkpoint after every step (the
    merged model only at the end), launched through the SLURM script."""
    scratch = tmp_path_factory.mktemp("lora_fsdp")
    out = scratch / "two"
    sbatch(scratch, RECIPE["config"], overrides(tiny_setup, out, max_steps_per_epoch=3, save_every_n_steps=1, **SGD,
                                                **BUDGET))  # fmt: skip
    return out


def test_two_ranks_take_the_same_step_as_one_process_with_the_global_batch(tiny_setup, two_ranks, tmp_path):
    """Two ranks in micro-batches by tokens, one process in one batch of 8: the same steps."""
    assert unequal_micro_batch_counts(tiny_setup, steps=3)  # so the ranks' agreement on the count was exercised
    one = tmp_path / "one"
    args = overrides(tiny_setup, one, batch_size=8, max_steps_per_epoch=1, **SGD)
    run_distributed_in_process(LoRADPORecipeDistributed, recipe_config(RECIPE["config"], args), tmp_path / "pg")
    assert logged(Cfg(two_ranks))[1]["loss"] == pytest.approx(logged(Cfg(one))[1]["loss"], rel=1e-6)
    a, b = adapter(one, 1), adapter(two_ranks, 1)
    assert_same(a, b, rtol=1e-5, atol=1e-7)
    lora_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert a[lora_b].abs().max() > 1e-4  # it moved from its zero start
    # every save has the PEFT adapter and the DCP shards; only the final one the merged model
    assert (two_ranks / "step_1" / "dcp").is_dir() and not (two_ranks / "step_1" / MERGED).exists()
    assert (two_ranks / "step_3" / MERGED).is_file()
    assert (two_ranks / "step_3" / "adapter/adapter_config.json").is_file()


def test_resume_equals_the_uninterrupted_run(tiny_setup, two_ranks, tmp_path):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two_ranks / "step_1", resumed / "step_1")  # as if killed after step 1
    output = torchrun(overrides(tiny_setup, resumed, max_steps_per_epoch=3, save_every_n_steps=1,
                                resume_from_checkpoint="true", **SGD, **BUDGET), **RECIPE)  # fmt: skip
    assert "resumed from" in output and min(logged(Cfg(resumed))) == 2
    for step in (2, 3):
        assert logged(Cfg(resumed))[step]["loss"] == logged(Cfg(two_ranks))[step]["loss"]
    assert_same(adapter(two_ranks, 3), adapter(resumed, 3), rtol=0, atol=0)
    assert_same(load_file(two_ranks / "step_3" / MERGED), load_file(resumed / "step_3" / MERGED), rtol=0, atol=0)


def test_precomputed_reference_matches_the_live_reference(tiny_setup, two_ranks, tmp_path):
    cached = tmp_path / "cached"
    output = torchrun(overrides(tiny_setup, cached, max_steps_per_epoch=3, **SGD, **BUDGET,
                                **{"reference.mode": "precomputed"}), **RECIPE)  # fmt: skip
    assert "reference log-probs for train: computed" in output
    for step in (1, 2, 3):
        assert logged(Cfg(cached))[step]["loss"] == pytest.approx(logged(Cfg(two_ranks))[step]["loss"], rel=1e-5)
    # the live reference runs in the micro-batches of 1 or 2 pairs, the cached one in batches of 4: other shapes,
    # other rounding
    assert_same(adapter(cached, 3), adapter(two_ranks, 3), rtol=1e-4, atol=1e-6)


def test_the_adapter_loads_in_peft_with_the_merged_models_logits(tiny_setup, two_ranks):
    with_adapter, tokens, expected = assert_peft_logits_equal(two_ranks / "step_3", tiny_setup / "sft_model")
    with torch.no_grad(), with_adapter.disable_adapter():  # PEFT wrapped the base model in place
        assert not torch.allclose(with_adapter(tokens).logits, expected, atol=1e-3)  # the adapter does something


def test_qlora_under_fsdp_merges_to_the_dequantized_base_plus_lora(tiny_setup, tmp_path):
    out = tmp_path / "qlora"
    torchrun(overrides(tiny_setup, out, max_steps_per_epoch=2, **{"model.quantize_base": "true"}), **RECIPE)
    assert all(row["loss"] > 0 for row in logged(Cfg(out)).values())
    base = load_file(tiny_setup / "sft_model" / "model.safetensors")
    lora = load_peft_adapter(out / "step_2", num_heads=4, num_kv_heads=2, dim=256)
    merged = load_file(out / "step_2" / MERGED)
    hf_key = "model.layers.1.mlp.down_proj.weight"  # no q/k permutation between HF and torchtune for this one
    a, b = lora["layers.1.mlp.w2.lora_a.weight"], lora["layers.1.mlp.w2.lora_b.weight"]
    assert b.abs().max() > 0
    expected = to_nf4(base[hf_key]).get_original_weight() + (32 / 16) * b @ a  # alpha / rank
    torch.testing.assert_close(merged[hf_key], expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(merged[hf_key], base[hf_key])


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes, read from /proc."""
    workers = {}
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = next((int(v.split(b"=")[1]) for v in environ if v.startswith(b"RANK=")), None)
        if rank is not None:
            workers[rank] = int(child)
    return workers


def test_a_rank_killed_mid_run_ends_the_launch_with_an_error(tiny_setup, tmp_path):
    out = tmp_path / "killed"
    process = launch(overrides(tiny_setup, out, max_steps_per_epoch=60, save_every_n_steps=2),
                     "--standalone", "--nproc_per_node=2", **RECIPE)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (out / "step_2").is_dir():  # mid-run: a checkpoint written, many steps to go
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-4000:]
        time.sleep(0.5)
    os.kill(_worker_pids(process.pid)[1], signal.SIGKILL)
    killed = time.monotonic()
    output, _ = process.communicate(timeout=180)
    assert process.returncode != 0 and time.monotonic() - killed < 120, output[-3000:]
    assert "step_60" not in os.listdir(out)


def test_qlora_on_one_rank_is_refused_clearly(recipe_cfg, tmp_path):
    cfg = recipe_cfg("recipe_configs/tiny/lora_dpo_distributed.yaml", **{"model.quantize_base": "true"})
    with pytest.raises(ConfigError, match="QLoRA .* under FSDP needs 2 or more ranks.*lora_dpo_single_device"):
        run_distributed_in_process(LoRADPORecipeDistributed, cfg, tmp_path / "pg")


def test_dora_starts_at_the_base_model_and_a_reference_free_loss_runs(tiny_setup, tmp_path):
    """One rank, in this process. DoRA's magnitude starts at the base weight's row norms (initial_adapter_state), so
    with lr 0 the merged model is the base model; SimPO needs no reference and trains the adapters."""
    dora = tmp_path / "dora"
    args = overrides(tiny_setup, dora, max_steps_per_epoch=1, **{"model.use_dora": "true", "optimizer.lr": 0.0})
    run_distributed_in_process(LoRADPORecipeDistributed, recipe_config(RECIPE["config"], args), tmp_path / "a")
    base, merged = load_file(tiny_setup / "sft_model" / "model.safetensors"), load_file(dora / "step_1" / MERGED)
    for key in base:
        torch.testing.assert_close(merged[key], base[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any("lora_magnitude_vector" in key for key in adapter(dora, 1))

    simpo = tmp_path / "simpo"
    args = overrides(
        tiny_setup,
        simpo,
        max_steps_per_epoch=2,
        **{"loss._component_": "dpo_components.losses.SimPOLoss", "loss.beta": 2.0, "~loss.label_smoothing": None},
    )
    recipe = run_distributed_in_process(LoRADPORecipeDistributed, recipe_config(RECIPE["config"], args), tmp_path / "b")
    assert not recipe._loss_fn.needs_reference and logged(Cfg(simpo))[2]["loss"] > 0
    assert adapter(simpo, 2)["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].abs().max() > 0
