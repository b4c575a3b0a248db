"""Seeing a run: tiny configs that work alone, the plot command, samples at eval, TensorBoard and W&B loggers."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from helpers import logged

from dpo_components.samples import SampleSettings, generate_padded, sample_and_score
from dpo_components.tiny import synthetic
from dpo_components.tiny.model import tiny_llama
from dpo_components.tiny.tokenizer import tiny_tokenizer
from dpo_components.tools import plot
from recipes.ipo_single_device import IPORecipeSingleDevice
from recipes.lora_dpo_single_device import LoRADPORecipeSingleDevice

SAMPLES = {"eval_samples": 6, "max_new_tokens": 24, "eval_reward_fn": "dpo_components.tiny.synthetic.sentiment_reward"}
TASK_WORDS = set(" ".join(synthetic.SUBJECTS + synthetic.VERBS + synthetic.POSITIVE + synthetic.NEGATIVE
                          + synthetic.NEUTRAL + synthetic.CONNECTORS).split())  # fmt: skip


def fresh_clone(tmp_path: Path) -> Path:
    """The repository's files (tracked and untracked, not ignored) copied to a new folder: no outputs/, no cache."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")  # fmt: skip
    clone = tmp_path / "clone"
    for name in filter(None, files):
        if (REPO_ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, clone / name)
    return clone


@pytest.mark.recipe
def test_tiny_config_runs_alone_from_a_fresh_clone_and_plots(tmp_path):
    clone = fresh_clone(tmp_path)
    assert not (clone / "outputs").exists()
    tune = shutil.which("tune") or pytest.fail("torchtune's `tune` CLI is not on PATH")
    small = ["prepare.sft_steps=20", "prepare.sft_examples=500", "prepare.train_pairs=64", "prepare.eval_pairs=16"]
    command = [tune, "run", "recipes/lora_dpo_single_device.py", "--config",
               "recipe_configs/tiny/lora_dpo_single_device.yaml", *small, "epochs=1", "max_steps_per_epoch=3",
               "batch_size=16", "log_every_n_steps=1", "eval_every_n_steps=null", "save_every_n_steps=null",
               "eval_samples=4", "max_new_tokens=16"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(clone)}
    result = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (clone / "outputs/tiny/sft_model/model.safetensors").is_file()  # prepared on first use
    assert (clone / "outputs/tiny_lora_dpo/step_3/adapter/adapter_model.safetensors").is_file()
    assert "Skipping import of cpp extensions" not in result.stderr + result.stdout
    hint = "python -m dpo_components.tools.plot outputs/tiny_lora_dpo"
    assert hint in result.stderr + result.stdout  # the recipe says how to plot the run

    plotted = subprocess.run([sys.executable, "-m", "dpo_components.tools.plot", "outputs/tiny_lora_dpo", "--metrics",
                              "loss", "rewards/accuracies", "eval/samples/kl", "lr"], cwd=clone, env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert plotted.returncode == 0, plotted.stderr[-3000:]
    drawn = plotted.stdout.split(": ", 1)[1].split(", ")
    assert {"loss", "rewards/accuracies", "eval/rewards/accuracies", "eval/samples/kl", "lr"} <= set(
        map(str.strip, drawn)
    )
    png = clone / "outputs/tiny_lora_dpo/metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_plot_draws_each_requested_metric_with_its_eval_counterpart(tmp_path):
    for i, run in enumerate(("a", "b")):
        logs = tmp_path / run / "logs"
        logs.mkdir(parents=True)
        lines = [f"Step {s} | loss:{0.7 - 0.01 * s - i * 0.1} rewards/accuracies:{0.5 + 0.02 * s} lr:0.001 "
                 for s in range(1, 11)]  # fmt: skip
        lines.append("Step 10 | eval/loss:0.6 eval/rewards/accuracies:0.7 ")
        (logs / "log_1.txt").write_text("\n".join(lines) + "\n")
    runs = {run: plot.read_run(tmp_path / run) for run in ("a", "b")}
    assert runs["a"]["loss"][10] == pytest.approx(0.6) and runs["a"]["eval/loss"] == {10: 0.6}
    assert plot.panels_for(["loss", "rewards/accuracies"], runs) == {
        "loss": ["loss", "eval/loss"],
        "rewards/accuracies": ["rewards/accuracies", "eval/rewards/accuracies"],
    }
    out = plot.plot_runs(runs, tmp_path / "compare.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    with pytest.raises(SystemExit, match=r"not logged in any run: \['eval/samples/kl'\]"):
        plot.plot_runs(runs, tmp_path / "x.png", ["eval/samples/kl"])


def test_samples_of_identical_models_have_zero_kl():
    torch.manual_seed(0)
    model, tokenizer = tiny_llama().eval(), tiny_tokenizer()
    prompts = [tokenizer.encode("the plot was", add_eos=False), tokenizer.encode("the film", add_eos=False)]
    settings = SampleSettings(prompts=2, max_new_tokens=8, reward_fn=synthetic.sentiment_reward)
    metrics, rows = sample_and_score(model, lambda: contextlib.nullcontext(model), prompts, tokenizer, settings, seed=0)
    assert metrics["eval/samples/kl"] == 0.0 and len(rows) == 2
    assert set(metrics) == {"eval/samples/kl", "eval/samples/reward", "eval/samples/reference_reward"}
    # Left padding must not change what a prompt generates (same seed, prompt alone vs in a padded batch).
    alone = generate_padded(model, prompts[1:], pad_id=tokenizer.pad_id, stop_tokens=None, max_new_tokens=6,
                            temperature=1e-4, rng=torch.Generator().manual_seed(0))  # fmt: skip
    batched = generate_padded(model, prompts, pad_id=tokenizer.pad_id, stop_tokens=None, max_new_tokens=6,
                              temperature=1e-4, rng=torch.Generator().manual_seed(0))  # fmt: skip
    assert alone[0] == batched[1]


def check_samples_file(cfg, with_reference=True):
    lines = (REPO_ROOT / cfg.output_dir / "logs" / "samples.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert rows and all(set(r) >= {"step", "prompt", "policy"} for r in rows)
    assert all(("reference" in r) == with_reference for r in rows)
    words = [w for r in rows for w in r["policy"].replace(".", " ").split()]
    assert words and sum(w in TASK_WORDS for w in words) / len(words) > 0.8  # decoded text of the task
    return rows


@pytest.mark.recipe
def test_lora_recipe_logs_samples_reward_and_kl(recipe_cfg):
    cfg = recipe_cfg(max_steps_per_epoch=4, eval_every_n_steps=2, **SAMPLES)
    recipe = LoRADPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    at_start = recipe.evaluate()  # adapters start at zero: the policy is the reference
    assert at_start["eval/samples/kl"] == 0.0
    recipe.train()
    recipe.cleanup()
    steps = logged(cfg)
    for step in (2, 4):
        assert {"eval/samples/reward", "eval/samples/reference_reward", "eval/samples/kl"} <= set(steps[step])
    assert steps[4]["eval/samples/kl"] != 0.0
    rows = check_samples_file(cfg)
    assert {r["step"] for r in rows} == {0, 2, 4} and len(rows) == 3 * 6


@pytest.mark.recipe
@pytest.mark.parametrize("mode", ["model", "precomputed"])
def test_ipo_recipe_logs_samples(recipe_cfg, mode):
    cfg = recipe_cfg("recipe_configs/tiny/ipo_single_device.yaml", max_steps_per_epoch=2,
                     **{"reference.mode": mode, **SAMPLES})  # fmt: skip
    recipe = IPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()
    final = logged(cfg)[2]
    assert "eval/samples/reward" in final
    # A precomputed reference keeps no reference model: policy samples only, no KL (said in the README).
    assert ("eval/samples/kl" in final) == (mode == "model")
    check_samples_file(cfg, with_reference=mode == "model")


LOGGER_RUN = {"max_steps_per_epoch": 2, "eval_every_n_steps": 2, **SAMPLES}


def run_lora(cfg):
    recipe = LoRADPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


@pytest.fixture(scope="module")
def disk_metrics(tiny_setup, tmp_path_factory):
    """The metrics a short run with samples logs through the DiskLogger: what the other loggers must match."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO_ROOT / "recipe_configs/tiny/lora_dpo_single_device.yaml")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([
        f"output_dir={tmp_path_factory.mktemp('disk_run')}", f"checkpointer.checkpoint_dir={tiny_setup}/sft_model",
        f"dataset.data_files={tiny_setup}/data/train.jsonl", f"eval_dataset.data_files={tiny_setup}/data/eval.jsonl",
        "epochs=1", "log_every_n_steps=1", "save_every_n_steps=null", *(f"{k}={v}" for k, v in LOGGER_RUN.items()),
    ]))  # fmt: skip
    run_lora(cfg)
    return plot.read_run(cfg.output_dir)


@pytest.mark.recipe
def test_tensorboard_logger_writes_the_disk_loggers_metrics(recipe_cfg, disk_metrics):
    pytest.importorskip("tensorboard", reason="pip install -e '.[loggers]'")
    cfg = recipe_cfg(
        **LOGGER_RUN, **{"metric_logger._component_": "torchtune.training.metric_logging.TensorBoardLogger"}
    )
    run_lora(cfg)
    from_events = plot.read_run(cfg.output_dir)
    assert set(from_events) == set(disk_metrics) and "eval/samples/kl" in from_events
    assert from_events["loss"] == pytest.approx(disk_metrics["loss"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_file,) = Path(cfg.output_dir, "logs").rglob("events.out.tfevents.*")
    events = EventAccumulator(str(events_file), size_guidance={"tensors": 0})
    events.Reload()
    assert "eval/samples/text_summary" in events.Tags()["tensors"]


@pytest.mark.recipe
def test_wandb_offline_run_has_the_disk_loggers_metrics(recipe_cfg, disk_metrics, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="pip install -e '.[loggers]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = recipe_cfg(**LOGGER_RUN, **{"metric_logger._component_": "torchtune.training.metric_logging.WandBLogger",
                                      "metric_logger.project": "dpo-test", "metric_logger.mode": "offline",
                                      "metric_logger.log_dir": str(tmp_path / "wandb_dir")})  # fmt: skip
    run_lora(cfg)
    (run_dir,) = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")
    (records,) = run_dir.glob("run-*.wandb")  # what `wandb sync` uploads; its history keys are stored as text
    assert {"loss", "rewards/accuracies", "eval/loss", "eval/samples/kl", "lr"} <= set(disk_metrics)
    data = records.read_bytes()
    assert [name for name in disk_metrics if name.encode() not in data] == []
    (table,) = (run_dir / "files/media/table/eval").glob("samples_2_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"] == ["step", "prompt", "policy", "reference"] and len(table["data"]) == 6


@pytest.mark.recipe
def test_sampling_at_eval_does_not_change_training(recipe_cfg, tmp_path):
    """Generation uses its own RNG and removes its KV caches: the run with samples trains exactly the same."""
    settings = {"max_steps_per_epoch": 4, "eval_every_n_steps": 2, "log_every_n_steps": 1}
    plain = recipe_cfg(**settings, output_dir=str(tmp_path / "plain"))
    sampled = recipe_cfg(**settings, **SAMPLES, output_dir=str(tmp_path / "sampled"))
    for cfg in (plain, sampled):
        run_lora(cfg)
    for step in (3, 4):  # after the eval at step 2
        assert logged(sampled)[step]["loss"] == logged(plain)[step]["loss"]
