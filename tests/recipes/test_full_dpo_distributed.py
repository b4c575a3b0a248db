"""The FSDP2 recipe on CPU with gloo and 2 processes: same step as 1 process, precomputed == live reference,
exact resume from a DCP checkpoint, a consolidated HF checkpoint, and the multi-node launch path."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT, recipe_config, run_distributed_in_process
from helpers import logged, overrides
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_configs import (
    DISTRIBUTED,
    assert_peft_logits_equal,
    assert_transformers_logits_equal,
    swap_for_tiny_stand_ins,
)
from torchtune.training import FullModelHFCheckpointer

from dpo_components.checkpointing import checkpoint_fingerprint, checkpoint_problem, write_manifest
from dpo_components.tiny.model import tiny_llama
from recipes.full_dpo_distributed import FullDPORecipeDistributed
from recipes.lora_dpo_distributed import LoRADPORecipeDistributed

CONFIG = "recipe_configs/tiny/full_dpo_distributed.yaml"
WEIGHTS = "model-00001-of-00001.safetensors"


def launch(args, *launcher, recipe="recipes/full_dpo_distributed.py", config=CONFIG):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, recipe, "--config", config, *args]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def torchrun(args, nproc=2, **recipe):
    process = launch(args, "--standalone", f"--nproc_per_node={nproc}", **recipe)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    return output


class Cfg:  # what `logged` needs
    def __init__(self, out):
        self.output_dir = str(out)


def weights(out, step):
    return load_file(out / f"step_{step}" / WEIGHTS)


def test_two_ranks_take_the_same_step_as_one_process_with_the_global_batch(tiny_setup, tmp_path):
    # SGD, not Adam: Adam's first step is lr * g / (|g| + eps), which turns fp32 reduction-order noise in
    # near-zero gradients into lr-sized differences; with SGD the weights compare the gradients themselves.
    one, two = tmp_path / "one", tmp_path / "two"
    sgd = {"optimizer._component_": "torch.optim.SGD", "optimizer.lr": 0.5}
    args = overrides(tiny_setup, one, batch_size=8, max_steps_per_epoch=1, eval_dataset="null", **sgd)
    run_distributed_in_process(FullDPORecipeDistributed, recipe_config(CONFIG, args), tmp_path / "pg")
    torchrun(overrides(tiny_setup, two, batch_size=4, max_steps_per_epoch=1, eval_dataset="null", **sgd), nproc=2)
    assert logged(Cfg(two))[1]["loss"] == pytest.approx(logged(Cfg(one))[1]["loss"], rel=1e-6)
    start = load_file(tiny_setup / "sft_model" / "model.safetensors")
    a, b = weights(one, 1), weights(two, 1)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # The consolidated checkpoint loads back with torchtune's HF checkpointer.
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(two / "step_1"),
        checkpoint_files=[WEIGHTS],
        model_type="LLAMA3_2",
        output_dir=str(tmp_path / "scratch"),
    )
    tiny_llama().load_state_dict(checkpointer.load_checkpoint()["model"], strict=True)


def in_process(args, tmp_path):
    """The recipe on one rank in this process (no torchrun start-up), with the tiny config and ``args``."""
    return run_distributed_in_process(FullDPORecipeDistributed, recipe_config(CONFIG, args), tmp_path / "pg")


def test_precomputed_reference_matches_the_live_reference(tiny_setup, tmp_path, caplog):
    live, cached = tmp_path / "live", tmp_path / "cached"
    torchrun(overrides(tiny_setup, live, max_steps_per_epoch=2, eval_dataset="null"))
    output = torchrun(overrides(tiny_setup, cached, max_steps_per_epoch=2, eval_dataset="null",
                                **{"reference.mode": "precomputed"}))  # fmt: skip
    assert "reference log-probs for train: computed" in output
    caplog.set_level(logging.INFO)
    in_process(overrides(tiny_setup, tmp_path / "again", max_steps_per_epoch=1, eval_dataset="null",
                         **{"reference.mode": "precomputed", "reference.cache_dir": cached / "reference_cache"}),
               tmp_path)  # fmt: skip
    # a later run reuses the cache (and builds no reference model)
    assert "reference log-probs for train: reused" in caplog.text
    for step in (1, 2):
        assert logged(Cfg(cached))[step]["loss"] == pytest.approx(logged(Cfg(live))[step]["loss"], rel=1e-5)
    a, b = weights(live, 2), weights(cached, 2)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resume_from_a_dcp_checkpoint_equals_the_uninterrupted_run(tiny_setup, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    settings = {"max_steps_per_epoch": 4, "save_every_n_steps": 2, "eval_dataset": "null"}
    torchrun(overrides(tiny_setup, full, **settings))
    assert (full / "step_2" / "dcp").is_dir() and not (full / "step_2" / WEIGHTS).exists()  # mid-run: DCP only
    resumed.mkdir()
    shutil.copytree(full / "step_2", resumed / "step_2")  # as if the run had been killed after step 2
    shutil.copytree(full / "step_4", resumed / "step_4")  # ... and step_4 had been damaged since
    shard = next((resumed / "step_4" / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1])
    output = torchrun(overrides(tiny_setup, resumed, resume_from_checkpoint=True, **settings))
    assert f"skipping checkpoint {resumed / 'step_4'}: dcp/{shard.name} has" in output  # and it took step_2
    assert min(logged(Cfg(resumed))) == 3
    a, b = weights(full, 4), weights(resumed, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_with_c10d_rendezvous(tiny_setup, tmp_path):
    out, port = tmp_path / "nodes", free_port()
    args = overrides(tiny_setup, out, max_steps_per_epoch=2, eval_dataset="null")
    nodes = [launch(args, "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                    f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=dpo-test") for _ in range(2)]  # fmt: skip
    for node in nodes:
        output, _ = node.communicate(timeout=300)
        assert node.returncode == 0, output[-4000:]
    assert (out / "step_2" / WEIGHTS).exists() and logged(Cfg(out))[2]["loss"] > 0


@pytest.mark.parametrize("config", DISTRIBUTED, ids=str)
def test_real_configs_run_with_tiny_stand_ins(config, tiny_setup, tiny_family, tmp_path):
    """Sizes and files are swapped for tiny stand-ins (test_configs.swap_for_tiny_stand_ins); everything else is the
    config's: a Qwen2.5 config keeps its builder family, tokenizer class and checkpoint model_type, a QLoRA one its
    NF4 base. The merged output of a non-Llama family loads in transformers with our model's logits. One rank, in
    this process (what 2 ranks do is tested with the tiny configs), except QLoRA, which needs two."""
    cfg = OmegaConf.load(REPO_ROOT / config)
    shipped = OmegaConf.to_container(cfg, resolve=False)
    family = swap_for_tiny_stand_ins(cfg, tiny_setup, tiny_family)
    if family is not None:
        assert cfg.tokenizer._component_ == shipped["tokenizer"]["_component_"]
        assert cfg.checkpointer.model_type == shipped["checkpointer"]["model_type"]
    ranks = 2 if "qlora" in config.name else 1  # NF4 under FSDP needs 2 (see test_qlora_on_one_rank_is_refused_clearly)
    cfg.gradient_accumulation_steps = min(cfg.gradient_accumulation_steps, 2)  # a size: two micro-batches accumulate
    step = cfg.batch_size * ranks * cfg.gradient_accumulation_steps  # one step's pairs; fewer eval pairs
    data_dir = tiny_family(family) / "data" if family == "llama3_2_vision" else tiny_setup / "data"  # with images
    for key, file, rows in (("dataset", "train.jsonl", step), ("eval_dataset", "eval.jsonl", 16)):
        cfg[key].update(source="json", data_files=str(data_dir / file), split=f"train[:{rows}]",
                        format="explicit")  # fmt: skip
    out = tmp_path / "out"
    cfg.update(output_dir=str(out), device="cpu", dtype="fp32", epochs=1, max_steps_per_epoch=1,
               eval_every_n_steps=None, save_every_n_steps=None)  # fmt: skip
    cfg.optimizer.pop("fused", None)  # a CUDA-only AdamW switch
    lora = "lora" in config.name
    if ranks == 2:
        OmegaConf.save(cfg, tmp_path / "config.yaml")
        torchrun([], recipe="recipes/lora_dpo_distributed.py", config=str(tmp_path / "config.yaml"))
    else:
        run_distributed_in_process(LoRADPORecipeDistributed if lora else FullDPORecipeDistributed, cfg, tmp_path)
    assert (out / "step_1" / WEIGHTS).exists()
    if family == "llama3_2_vision":  # torchtune exports its adapter in its own names; docs/vision.md on HF parity
        assert (out / "step_1" / "adapter" / "adapter_model.torchtune.safetensors").exists()
        return
    assert (out / "step_1" / "adapter" / "adapter_model.safetensors").exists() == lora
    if family is not None:
        assert_transformers_logits_equal(out / "step_1", family)
    if lora and ranks == 1:  # QLoRA's merged base is NF4-rounded: not base + adapter
        assert_peft_logits_equal(out / "step_1", cfg.checkpointer.checkpoint_dir)


def test_reference_free_loss_needs_no_reference_model(tiny_setup, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "simpo"
    in_process(overrides(tiny_setup, out, max_steps_per_epoch=2, eval_dataset="null",
                         **{"loss._component_": "dpo_components.losses.SimPOLoss", "loss.beta": 2.0,
                            "reference.mode": "precomputed"}), tmp_path)  # fmt: skip
    assert "ranks (gloo)" in caplog.text  # the recipe's log is captured
    assert "reference log-probs" not in caplog.text and not (out / "reference_cache").exists()
    assert logged(Cfg(out))[2]["loss"] > 0


def test_prefix_sharing_and_length_grouping_under_fsdp(tiny_setup, tmp_path):
    """On one rank in this process (the per-rank slicing of a global batch is the same code for any world size)."""
    base, shared, grouped = tmp_path / "base", tmp_path / "shared", tmp_path / "grouped"
    common = {"batch_size": 8, "max_steps_per_epoch": 2, "eval_dataset": "null"}
    in_process(overrides(tiny_setup, base, **common), tmp_path / "a")
    in_process(overrides(tiny_setup, shared, prefix_sharing="true", **common), tmp_path / "b")
    in_process(overrides(tiny_setup, grouped, prefix_sharing="true", group_by_length="true", **common), tmp_path / "c")
    base_rows, shared_rows, grouped_rows = logged(Cfg(base)), logged(Cfg(shared)), logged(Cfg(grouped))
    for step in (1, 2):  # the same pairs in shared rows: the same losses
        for name in ("loss", "rewards/margins"):
            assert shared_rows[step][name] == pytest.approx(base_rows[step][name], rel=1e-4, abs=1e-5), (step, name)
    padding = lambda rows: sum(r["padding_fraction"] for r in rows.values())
    assert padding(grouped_rows) < padding(shared_rows)  # similar lengths in each global batch


def test_eval_samples_with_sharded_models(tiny_setup, tmp_path):
    """Each rank samples its share (3 prompts on 2 ranks: uneven) with the FSDP models; rank 0 logs them in order.
    With lr = 0 the policy stays the reference, so the KL estimate must be exactly 0."""
    out = tmp_path / "samples"
    torchrun(overrides(tiny_setup, out, max_steps_per_epoch=1, eval_samples=3, max_new_tokens=12, **{
        "optimizer.lr": 0.0, "eval_reward_fn": "dpo_components.tiny.synthetic.sentiment_reward"}))  # fmt: skip
    rows = [json.loads(line) for line in (out / "logs/samples.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 1, 1] and all(row["reference"] for row in rows)
    from dpo_components.data import preference_dataset
    from dpo_components.samples import eval_prompts
    from dpo_components.tiny.tokenizer import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    eval_data = preference_dataset(tokenizer, source="json", data_files=str(tiny_setup / "data/eval.jsonl"),
                                   max_length=96, max_prompt_length=32)  # fmt: skip
    prompts = [tokenizer.decode(p).strip() for p in eval_prompts(eval_data, 3)]
    assert [row["prompt"] for row in rows] == prompts
    final = logged(Cfg(out))[1]
    assert final["eval/samples/kl"] == 0.0
    assert {"eval/samples/reward", "eval/samples/reference_reward"} <= set(final)


def test_an_error_on_one_rank_ends_every_rank_quickly(tiny_setup, tmp_path):
    """Rank 1 fails at setup (its RNG file of the checkpoint is not a tensor file, and the manifest was rewritten to
    match, so only rank 1 notices) while rank 0 goes on into FSDP's all-gather: rank 1 must print its error and the
    launch must end, not hang in a barrier or a collective."""
    out = tmp_path / "fail"
    settings = {"max_steps_per_epoch": 2, "save_every_n_steps": 2, "eval_dataset": "null", "epochs": 2}
    torchrun(overrides(tiny_setup, out, **settings))
    shutil.rmtree(out / "step_4")  # as if killed after step 2: the resumed run has steps to train
    (out / "step_2" / "rng_rank1.pt").write_bytes(b"not a checkpoint")
    write_manifest(out / "step_2", run=checkpoint_fingerprint(out / "step_2"))
    start = time.monotonic()
    process = launch(overrides(tiny_setup, out, resume_from_checkpoint=True, **settings),
                     "--standalone", "--nproc_per_node=2")  # fmt: skip
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0 and time.monotonic() - start < 120
    assert "rank 1 failed" in output and "rng_rank1.pt" in output


def test_every_rank_refuses_a_resume_without_a_complete_checkpoint(tiny_setup, tmp_path):
    """Rank 0 checks the manifests and sends its verdict to every rank: the launch ends with that message, no hang."""
    out = tmp_path / "broken"
    (out / "step_3").mkdir(parents=True)  # no manifest: a save that never finished
    process = launch(overrides(tiny_setup, out, resume_from_checkpoint=True), "--standalone", "--nproc_per_node=2")
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0 and "rank 0 failed" in output
    assert "no checkpoint in" in output and "step_3: it has no manifest.json" in output


def test_a_full_disk_under_two_ranks_names_enospc_and_keeps_the_last_checkpoint(tiny_setup, tmp_path):
    """The output_dir on a 64 MiB tmpfs (a user namespace): step_1 (DCP shards with AdamW's state, about 40 MB)
    fits, step_2 (the shards and the consolidated HF weights) does not. The run ends naming ENOSPC and the
    checkpoint, nothing of step_2 is left, and step_1 is complete."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("this machine lets no user mount a tmpfs (unshare -rm)")
    full, copy = tmp_path / "full", tmp_path / "copy"
    full.mkdir()
    args = overrides(tiny_setup, full, max_steps_per_epoch=2, save_every_n_steps=1, eval_dataset="null")
    command = " ".join([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "recipes/full_dpo_distributed.py", "--config", CONFIG, *args])  # fmt: skip
    shell = f"mount -t tmpfs -o size=64m tmpfs {full} && {command}; status=$?; cp -a {full} {copy}; exit $status"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", shell], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-4000:]
    assert f"CheckpointError: could not write checkpoint {full}/step_2 (WriteError: could not write " in output
    assert "ENOSPC (No space left on device)" in output and f"the last good checkpoint is {full}/step_1" in output
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith((".", "step_"))) == ["step_1"]
    assert checkpoint_problem(copy / "step_1") is None
