"""The demo over seeds: does "DPO clearly worked" hold for every SFT seed and every DPO seed, or only for one?

    OMP_NUM_THREADS=1 python -m dpo_components.tools.demo_seeds            # 5 SFT seeds x 5 DPO seeds, 2 at a time
    OMP_NUM_THREADS=1 python -m dpo_components.tools.demo_seeds --sft-seeds 0 1 --dpo-seeds 0 --jobs 1

For each SFT seed s, ``prepare_tiny(seed=s)`` builds its own synthetic data and SFT model (seed 0 is the demo's
``outputs/tiny``); for each DPO seed d the demo's recipe and config run on it with ``seed=d`` (the LoRA init and the
data order), and ``dpo_components.tiny.task_eval`` judges the result exactly as ``scripts/demo.py`` does. Every run
is its own process, ``--jobs`` at a time. Writes ``results.json`` and ``results.md`` (one row per run, then the
min / median / max of each figure and how many runs pass) to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import OmegaConf

from dpo_components.checkpointing import latest_checkpoint
from dpo_components.tiny.task_eval import demo_failures, evaluate, load_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout: it runs recipes/ with recipe_configs/
CONFIG = "recipe_configs/tiny/lora_dpo_single_device.yaml"
FIGURES = ("accuracy", "reward_gain", "kl", "words", "well_formed", "well_formed_sft", "seconds")


def sft_dir(output_dir: Path, sft_seed: int) -> Path:
    return REPO_ROOT / "outputs/tiny" if sft_seed == 0 else output_dir / f"sft_seed{sft_seed}"


def run_one(output_dir: Path, sft_seed: int, dpo_seed: int, overrides: list[str]) -> dict:
    """Train the demo's DPO on SFT seed ``sft_seed`` with ``seed=dpo_seed`` and judge it (in this process)."""
    tiny = sft_dir(output_dir, sft_seed)
    run_dir = output_dir / f"sft{sft_seed}_dpo{dpo_seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    command = ["tune", "run", "recipes/lora_dpo_single_device.py", "--config", CONFIG, f"output_dir={run_dir}",
               f"seed={dpo_seed}", f"prepare.out_dir={tiny}", f"checkpointer.checkpoint_dir={tiny}/sft_model",
               f"dataset.data_files={tiny}/data/train.jsonl", f"eval_dataset.data_files={tiny}/data/eval.jsonl",
               *overrides]  # fmt: skip
    with open(output_dir / f"sft{sft_seed}_dpo{dpo_seed}.log", "w") as log:
        subprocess.run(command, cwd=REPO_ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    beta = OmegaConf.merge(OmegaConf.load(REPO_ROOT / CONFIG), OmegaConf.from_dotlist(overrides)).loss.beta
    sft = load_tiny_checkpoint(tiny / "sft_model", run_dir / "scratch")
    dpo = load_tiny_checkpoint(latest_checkpoint(run_dir), run_dir / "scratch")
    before, after, _ = evaluate(dpo, sft, tiny / "data/eval.jsonl", beta)
    return {
        "sft_seed": sft_seed, "dpo_seed": dpo_seed, "accuracy": after["accuracy"],
        "reward_sft": before["reward"], "reward": after["reward"], "reward_gain": after["reward"] - before["reward"],
        "kl": after["kl"], "words_sft": before["words"], "words": after["words"],
        "well_formed_sft": before["well_formed"], "well_formed": after["well_formed"],
        "seconds": seconds,
    }  # fmt: skip


def failures(row: dict) -> list[str]:
    before = {"accuracy": 0.5, "reward": row["reward_sft"], "words": row["words_sft"]}
    return demo_failures(before, {"accuracy": row["accuracy"], "reward": row["reward"], "words": row["words"]})


def _in_subprocess(output_dir: Path, sft_seed: int, dpo_seed: int, overrides: list[str]) -> None:
    command = [sys.executable, __file__, "--output-dir", str(output_dir), "--one", str(sft_seed), str(dpo_seed),
               *overrides]  # fmt: skip
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def write_tables(results: list[dict], output_dir: Path, command: str) -> Path:
    for row in results:
        row["failures"] = failures(row)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"`{command}`: {len(results)} runs, {sum(not r['failures'] for r in results)} pass "
        f"(held-out accuracy >= 0.9, true reward up by >= 0.3, >= 95% of sampled words are task words)",
        "",
        "| SFT seed | DPO seed | accuracy | reward SFT -> DPO | KL (nats) | task words SFT -> DPO "
        "| well-formed SFT -> DPO | train s | pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['sft_seed']} | {r['dpo_seed']} | {r['accuracy']:.3f} | {r['reward_sft']:.3f} -> {r['reward']:.3f} "
            f"| {r['kl']:.2f} | {r['words_sft']:.3f} -> {r['words']:.3f} "
            f"| {r['well_formed_sft']:.3f} -> {r['well_formed']:.3f} | {r['seconds']:.0f} "
            f"| {'yes' if not r['failures'] else 'no: ' + '; '.join(r['failures'])} |"
        )
    lines += ["", "| figure | min | median | max |", "|---|---|---|---|"]
    for key in FIGURES:
        values = [r[key] for r in results]
        lines.append(f"| {key} | {min(values):.3f} | {statistics.median(values):.3f} | {max(values):.3f} |")
    path = output_dir / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--dpo-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs/demo_seeds")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the tables from the runs' json files")
    parser.add_argument("--one", type=int, nargs=2, metavar=("SFT_SEED", "DPO_SEED"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the recipe config, for every run")
    args = parser.parse_args()
    output_dir = args.output_dir.resolve()
    if args.one:
        result = run_one(output_dir, *args.one, args.overrides)
        (output_dir / f"sft{args.one[0]}_dpo{args.one[1]}.json").write_text(json.dumps(result) + "\n")
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs = [(s, d) for s in args.sft_seeds for d in args.dpo_seeds]
    if not args.tables_only:
        with ThreadPoolExecutor(args.jobs) as pool:  # each SFT build and each run is a process of its own
            list(pool.map(lambda s: prepare_in_subprocess(output_dir, s), args.sft_seeds))
            list(pool.map(lambda sd: _in_subprocess(output_dir, *sd, args.overrides), runs))
    done = [output_dir / f"sft{s}_dpo{d}.json" for s, d in runs]
    results = [json.loads(f.read_text()) for f in done if f.exists() or not args.tables_only]  # tables: runs so far
    command = "python -m dpo_components.tools.demo_seeds " + " ".join(a for a in sys.argv[1:] if a != "--tables-only")
    table = write_tables(results, output_dir, command.strip())
    print(table.read_text())
    print(f"{len(results)} runs in {time.perf_counter() - start:.0f} s; tables in {output_dir}")


def prepare_in_subprocess(output_dir: Path, sft_seed: int) -> None:
    target = str(sft_dir(output_dir, sft_seed))
    code = f"from dpo_components.tiny.prepare import prepare_tiny; prepare_tiny({target!r}, seed={sft_seed})"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


if __name__ == "__main__":
    main()
