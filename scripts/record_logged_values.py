"""Record every logged value of short tiny runs of all five recipes, as strings, for a before/after comparison.

    OMP_NUM_THREADS=1 python scripts/record_logged_values.py outputs/logged_before.json
    ... change the code ...
    OMP_NUM_THREADS=1 python scripts/record_logged_values.py outputs/logged_after.json
    diff outputs/logged_before.json outputs/logged_after.json   # a refactor that changes no behaviour: empty

Each run is a few steps of a tiny config (the tests' small SFT'd model and synthetic pairs, built once in a scratch
dir) with a variant of the switches that change the step: packing, prefix sharing, a token budget, the precomputed
reference, KTO, eval and eval samples; the FSDP2 recipes run as one gloo rank in this process. What is recorded is
what the DiskLogger wrote (every metric line, and the sampled texts), less the wall-clock figures (tokens/s, peak
memory, seconds). About 3 minutes on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torchtune.config._utils import _merge_yaml_and_cli_args

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # our recipes/ before the `recipes` package torchtune's wheel installs

WALL_CLOCK = ("tokens_per_second", "peak_memory_gib", "_seconds")

# name: (recipe module, recipe class, config, key=value overrides)
RUNS: dict[str, tuple[str, str, str, list[str]]] = {
    "lora": ("lora_dpo_single_device", "LoRADPORecipeSingleDevice", "lora_dpo_single_device",
             ["max_steps_per_epoch=4", "eval_every_n_steps=2", "eval_samples=2", "batch_size=8",
              "gradient_accumulation_steps=2"]),
    "lora_packed_budget": ("lora_dpo_single_device", "LoRADPORecipeSingleDevice", "lora_dpo_single_device",
                           ["max_steps_per_epoch=3", "batch_size=4", "gradient_accumulation_steps=2", "packing=true",
                            "prefix_sharing=true", "max_micro_batch_tokens=150"]),
    "lora_precomputed": ("lora_dpo_single_device", "LoRADPORecipeSingleDevice", "lora_dpo_single_device",
                         ["max_steps_per_epoch=3", "batch_size=8", "reference.mode=precomputed",
                          "eval_every_n_steps=3"]),
    "kto": ("lora_dpo_single_device", "LoRADPORecipeSingleDevice", "lora_kto_single_device",
            ["max_steps_per_epoch=3", "batch_size=8"]),
    "ipo": ("ipo_single_device", "IPORecipeSingleDevice", "ipo_single_device",
            ["max_steps_per_epoch=3", "batch_size=4", "gradient_accumulation_steps=2", "eval_every_n_steps=3",
             "max_micro_batch_tokens=200"]),
    "full_fsdp": ("full_dpo_distributed", "FullDPORecipeDistributed", "full_dpo_distributed",
                  ["max_steps_per_epoch=3", "batch_size=4", "gradient_accumulation_steps=2", "eval_every_n_steps=3"]),
    "full_fsdp_packed": ("full_dpo_distributed", "FullDPORecipeDistributed", "full_dpo_distributed",
                         ["max_steps_per_epoch=2", "batch_size=4", "packing=true", "max_micro_batch_tokens=200",
                          "reference.mode=precomputed"]),
    "lora_fsdp": ("lora_dpo_distributed", "LoRADPORecipeDistributed", "lora_dpo_distributed",
                  ["max_steps_per_epoch=3", "batch_size=4", "gradient_accumulation_steps=2", "eval_every_n_steps=3",
                   "eval_samples=2"]),
    "lora_fsdp_prefix_precomputed": ("lora_dpo_distributed", "LoRADPORecipeDistributed", "lora_dpo_distributed",
                                     ["max_steps_per_epoch=2", "batch_size=4", "prefix_sharing=true",
                                      "reference.mode=precomputed", "max_micro_batch_tokens=150"]),
    "online": ("online_dpo_single_device", "OnlineDPORecipeSingleDevice", "online_dpo_single_device",
               ["online.rounds=2", "online.prompts_per_round=16", "online.steps_per_round=2",
                "online.max_new_tokens=16", "batch_size=4", "gradient_accumulation_steps=2", "log_every_n_steps=1",
                "eval_every_n_steps=2", "eval_samples=2", "eval_dataset.split=train[:16]"]),
}


def paths(tiny: Path, out: Path, config: str) -> list[str]:
    data = "prompt_dataset" if config.startswith("online") else "dataset"
    return [f"output_dir={out}", "prepare=null", f"checkpointer.checkpoint_dir={tiny / 'sft_model'}",
            f"{data}.data_files={tiny / 'data/train.jsonl'}", f"eval_dataset.data_files={tiny / 'data/eval.jsonl'}",
            "log_every_n_steps=1"]


def logged_lines(out: Path) -> list[str]:
    lines = []
    for log_file in sorted((out / "logs").glob("*.txt")):
        for line in log_file.read_text().splitlines():
            step, _, values = line.partition(" | ")
            kept = [v for v in values.split(" ") if not any(w in v.split(":")[0] for w in WALL_CLOCK)]
            lines.append(f"{step} | {' '.join(kept)}")
    samples = out / "logs" / "samples.jsonl"
    return lines + (samples.read_text().splitlines() if samples.exists() else [])


def run(name: str, tiny: Path, scratch: Path) -> list[str]:
    module, cls, config, overrides = RUNS[name]
    out = scratch / name
    yaml = OmegaConf.to_container(OmegaConf.load(REPO / f"recipe_configs/tiny/{config}.yaml"))
    cfg = _merge_yaml_and_cli_args(Namespace(**yaml), paths(tiny, out, config) + overrides)
    recipe_class = getattr(__import__(f"recipes.{module}", fromlist=[cls]), cls)
    distributed = "distributed" in module
    if distributed:
        dist.init_process_group("gloo", init_method=f"file://{scratch / (name + '.pg')}", rank=0, world_size=1)
    try:
        recipe = recipe_class(cfg)
        recipe.setup(cfg)
        recipe.train()
        recipe.cleanup()
    finally:
        if distributed:
            dist.destroy_process_group()
    return logged_lines(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", default=None, help="comma-separated run names")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from dpo_components.tiny.prepare import prepare_tiny

    names = args.only.split(",") if args.only else list(RUNS)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = prepare_tiny(Path(tmp) / "tiny", sft_steps=60, sft_examples=2000, train_pairs=256, eval_pairs=64)
        recorded = {name: run(name, tiny, Path(tmp)) for name in names}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(recorded, indent=1) + "\n")
    print(f"{sum(map(len, recorded.values()))} logged lines of {len(recorded)} runs -> {args.out}")


if __name__ == "__main__":
    main()
