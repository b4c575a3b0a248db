"""The tiny DPO demo on CPU: SFT a tiny model, run the LoRA DPO recipe, show that it worked.

    OMP_NUM_THREADS=1 python scripts/demo.py

1. builds the SFT'd tiny model and the synthetic preference data under outputs/tiny (cached after the first run);
2. runs ``tune run recipes/lora_dpo_single_device.py --config recipe_configs/tiny/lora_dpo_single_device.yaml``;
3. loads the final merged checkpoint back from disk and prints a before/after table: held-out preference
   accuracy and mean reward margin (implicit DPO reward against the SFT reference), and the task's true
   sentiment reward of responses sampled from the SFT policy and from the DPO policy;
4. plots the run's metrics to outputs/tiny_lora_dpo/metrics.png (``python -m dpo_components.plot``).
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torchtune.training import FullModelHFCheckpointer

from dpo_components import plot, synthetic
from dpo_components.checkpointing import latest_checkpoint
from dpo_components.data import collate_preference_batch, preference_dataset
from dpo_components.losses import DPOLoss
from dpo_components.prepare_tiny import prepare_tiny, sample_responses
from dpo_components.tiny_model import tiny_llama
from dpo_components.tiny_tokenizer import tiny_tokenizer
from dpo_components.training import PreferenceMetrics, concatenated_logprobs

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = "recipe_configs/tiny/lora_dpo_single_device.yaml"


def load_hf_model(checkpoint_dir: Path) -> torch.nn.Module:
    files = sorted(p.name for p in checkpoint_dir.glob("model*.safetensors"))
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(checkpoint_dir),
        checkpoint_files=files,
        model_type="LLAMA3_2",
        output_dir=str(REPO_ROOT / "outputs/.scratch"),
    )
    model = tiny_llama()
    model.load_state_dict(checkpointer.load_checkpoint()["model"])
    return model.eval()


@torch.no_grad()
def heldout_preference(policy, reference, eval_file: Path, beta: float) -> dict[str, float]:
    """Implicit-reward accuracy and margin of ``policy`` against ``reference`` on the held-out pairs."""
    tokenizer = tiny_tokenizer()
    data = preference_dataset(tokenizer, source="json", data_files=str(eval_file), max_length=96, max_prompt_length=32)
    metrics = PreferenceMetrics()
    loss = DPOLoss(beta=beta)
    for batch in DataLoader(
        data, batch_size=32, collate_fn=partial(collate_preference_batch, padding_idx=tokenizer.pad_id)
    ):
        policy_logps = concatenated_logprobs(policy, batch)
        metrics.update(loss(policy_logps, concatenated_logprobs(reference, batch)), policy_logps)
    return metrics.compute()


def sampled_rewards(model, prompts: list[str]) -> tuple[float, list[str]]:
    responses = sample_responses(model, tiny_tokenizer(), prompts, seed=1)
    return sum(map(synthetic.sentiment_reward, responses)) / len(prompts), responses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the recipe config")
    args = parser.parse_args()
    start = time.perf_counter()
    tiny_dir = prepare_tiny(REPO_ROOT / "outputs/tiny")
    output_dir = REPO_ROOT / "outputs/tiny_lora_dpo"
    shutil.rmtree(output_dir, ignore_errors=True)  # a fresh run every time (the recipe would refuse to mix)
    print(f"SFT model and data ready in {tiny_dir} ({time.perf_counter() - start:.0f} s); running DPO ...")
    command = ["tune", "run", "recipes/lora_dpo_single_device.py", "--config", CONFIG, *args.overrides]
    subprocess.run(command, cwd=REPO_ROOT, check=True)

    cfg = OmegaConf.load(REPO_ROOT / CONFIG)
    sft = load_hf_model(tiny_dir / "sft_model")
    dpo = load_hf_model(latest_checkpoint(output_dir))
    eval_file = tiny_dir / "data/eval.jsonl"
    before = heldout_preference(sft, sft, eval_file, cfg.loss.beta)
    after = heldout_preference(dpo, sft, eval_file, cfg.loss.beta)
    rng = random.Random(1)
    prompts = [synthetic.sample_prompt(rng) for _ in range(256)]
    reward_sft, responses_sft = sampled_rewards(sft, prompts)
    reward_dpo, responses_dpo = sampled_rewards(dpo, prompts)

    print(
        f"\nTiny LoRA DPO on the synthetic sentiment task ({len(prompts)} sampled prompts, "
        f"{time.perf_counter() - start:.0f} s in all)\n"
    )
    print(f"| {'':48} | {'SFT (before)':>12} | {'DPO (after)':>11} |")
    print(f"|{'-' * 50}|{'-' * 14}|{'-' * 13}|")
    rows = [
        ("held-out preference accuracy (implicit reward)", before["rewards/accuracies"], after["rewards/accuracies"]),
        ("held-out mean reward margin", before["rewards/margins"], after["rewards/margins"]),
        ("true sentiment reward of sampled responses", reward_sft, reward_dpo),
    ]
    for name, a, b in rows:
        print(f"| {name:48} | {a:>12.3f} | {b:>11.3f} |")
    figure = plot.plot_runs({"tiny LoRA DPO": plot.read_run(output_dir)}, output_dir / "metrics.png")
    print(f"\nMetrics plotted to {figure}")
    print("\nSamples (prompt | SFT | DPO):")
    for prompt, a, b in list(zip(prompts, responses_sft, responses_dpo))[:4]:
        print(f"  {prompt} | {a} | {b}")
    if after["rewards/accuracies"] < 0.9 or reward_dpo < reward_sft + 0.2:
        sys.exit("DPO did not clearly work on this run (accuracy < 0.9 or reward not up by 0.2)")


if __name__ == "__main__":
    main()
