"""The tiny DPO demo on CPU: SFT a tiny model, run the LoRA DPO recipe, show that it worked.

    OMP_NUM_THREADS=1 python scripts/demo.py

1. builds the SFT'd tiny model and the synthetic preference data under outputs/tiny (cached after the first run);
2. runs ``tune run recipes/lora_dpo_single_device.py --config recipe_configs/tiny/lora_dpo_single_device.yaml``;
3. loads the final merged checkpoint back from disk and prints a before/after table
   (``dpo_components.tiny.task_eval``): held-out preference accuracy and mean reward margin (implicit DPO reward
   against the SFT reference), and for responses sampled from the SFT and the DPO policy the task's true
   sentiment reward, the KL from the SFT policy and two fluency figures; exits 1 if DPO did not clearly work;
4. plots the run's metrics to outputs/tiny_lora_dpo/metrics.png (``python -m dpo_components.tools.plot``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from dpo_components.checkpointing import latest_checkpoint
from dpo_components.tiny.prepare import prepare_tiny
from dpo_components.tiny.task_eval import demo_failures, evaluate, load_tiny_checkpoint
from dpo_components.tools import plot

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = "recipe_configs/tiny/lora_dpo_single_device.yaml"
ROWS = (  # key of task_eval.evaluate, label
    ("accuracy", "held-out preference accuracy (implicit reward)"),
    ("margin", "held-out mean reward margin"),
    ("reward", "true sentiment reward of sampled responses"),
    ("kl", "KL(policy || SFT) of sampled responses, nats"),
    ("words", "share of sampled words that are task words"),
    ("well_formed", "share of samples that follow the task grammar"),
)


def print_table(before: dict[str, float], after: dict[str, float]) -> None:
    print(f"| {'':48} | {'SFT (before)':>12} | {'DPO (after)':>11} |")
    print(f"|{'-' * 50}|{'-' * 14}|{'-' * 13}|")
    for key, label in ROWS:
        print(f"| {label:48} | {before[key]:>12.3f} | {after[key]:>11.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the recipe config")
    args = parser.parse_args()
    start = time.perf_counter()
    tiny_dir = prepare_tiny(REPO_ROOT / "outputs/tiny")
    cfg = OmegaConf.merge(OmegaConf.load(REPO_ROOT / CONFIG), OmegaConf.from_dotlist(args.overrides))
    output_dir = REPO_ROOT / cfg.output_dir  # outputs/tiny_lora_dpo unless overridden
    shutil.rmtree(output_dir, ignore_errors=True)  # a fresh run every time (the recipe would refuse to mix)
    print(f"SFT model and data ready in {tiny_dir} ({time.perf_counter() - start:.0f} s); running DPO ...")
    command = ["tune", "run", "recipes/lora_dpo_single_device.py", "--config", CONFIG, *args.overrides]
    subprocess.run(command, cwd=REPO_ROOT, check=True)

    beta = cfg.loss.beta
    scratch = REPO_ROOT / "outputs/.scratch"
    sft = load_tiny_checkpoint(tiny_dir / "sft_model", scratch)
    dpo = load_tiny_checkpoint(latest_checkpoint(output_dir), scratch)
    eval_file = tiny_dir / "data/eval.jsonl"
    before, after, rows = evaluate(dpo, sft, eval_file, beta)

    print(f"\nTiny LoRA DPO on the synthetic sentiment task (256 sampled prompts, "
          f"{time.perf_counter() - start:.0f} s in all)\n")  # fmt: skip
    print_table(before, after)
    figure = plot.plot_runs({"tiny LoRA DPO": plot.read_run(output_dir)}, output_dir / "metrics.png")
    print(f"\nMetrics plotted to {figure}")
    print("\nSamples (prompt | SFT | DPO):")
    for row in rows[:4]:
        print(f"  {row['prompt']} | {row['reference']} | {row['policy']}")
    if problems := demo_failures(before, after):
        sys.exit("DPO did not clearly work on this run: " + "; ".join(problems))


if __name__ == "__main__":
    main()
