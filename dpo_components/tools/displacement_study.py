"""Likelihood displacement on the tiny task: data built to displace against the demo's data, DPO against its fixes.

    OMP_NUM_THREADS=1 python -m dpo_components.tools.displacement_study            # 2 data x 3 losses x 3 seeds
    OMP_NUM_THREADS=1 python -m dpo_components.tools.displacement_study --seeds 0 --jobs 1

Data: ``near-duplicates`` (chosen and rejected differ in one word: ``synthetic.near_duplicate_pairs``) and
``demo`` (the demo's pairs: two independent SFT samples, the better one chosen). Losses: the demo's DPO (beta 5),
DPO + NLL (``loss.nll_weight=1``, RPO's term) and DPOP (``DPOPLoss``, lambda 50, the paper's). Each run is the
demo's recipe and config (``recipes/lora_dpo_single_device.py``, 62 steps) with ``seed`` = the LoRA init and the
data order, in its own process, ``--jobs`` at a time.

Per run: the logged ``displacement/*`` trajectories, whether and when the displacement warning fired, held-out
preference accuracy and the true reward of samples (``dpo_components.tiny.task_eval``, as the demo judges), and the
Spearman rank correlation between each training pair's CHES at step 0 (``dpo_components.audit``, under the
SFT model) and how far its chosen log-prob per token fell by the end. Writes ``results.json``, ``results.md`` and
``displacement.png`` to ``--output-dir``; docs/losses.md#likelihood-displacement shows them.
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
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dpo_components.audit import audit_pairs, audit_report
from dpo_components.checkpointing import latest_checkpoint
from dpo_components.data import make_collator, preference_dataset
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.tiny import synthetic
from dpo_components.tiny.prepare import prepare_tiny
from dpo_components.tiny.task_eval import evaluate, load_tiny_checkpoint
from dpo_components.tiny.tokenizer import tiny_tokenizer
from dpo_components.tools.plot import read_disk_log

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = "recipe_configs/tiny/lora_dpo_single_device.yaml"
LOSSES = {
    "DPO": [],
    "DPO + NLL": ["loss.nll_weight=1.0"],
    "DPOP": ["loss._component_=dpo_components.losses.DPOPLoss", "loss.dpop_lambda=50", "~loss.label_smoothing"],
}
WARNING = "likelihood displacement"


def data_files(output_dir: Path, tiny: Path) -> dict[str, tuple[Path, Path]]:
    """(train, eval) files of each data kind; the near-duplicates built as many as the demo's."""
    near = output_dir / "data"
    if not (near / "train.jsonl").exists():
        synthetic.write_jsonl(synthetic.near_duplicate_pairs(2000, seed=1), near / "train.jsonl")
        synthetic.write_jsonl(synthetic.near_duplicate_pairs(200, seed=2), near / "eval.jsonl")
    return {"near-duplicates": (near / "train.jsonl", near / "eval.jsonl"),
            "demo": (tiny / "data/train.jsonl", tiny / "data/eval.jsonl")}  # fmt: skip


def _dataset(path: Path):
    return preference_dataset(tiny_tokenizer(), source="json", data_files=str(path), max_length=96,
                              max_prompt_length=32)  # fmt: skip  (the tiny config's)


@torch.no_grad()
def chosen_logps_per_token(model, dataset, batch_size: int = 64) -> np.ndarray:
    collate = make_collator(tiny_tokenizer().pad_id, model.max_seq_len, datasets={"d": dataset})
    out = []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        logps = concatenated_logprobs(model, batch, 256, False)
        out.append((logps.chosen_logps / logps.chosen_tokens).numpy())
    return np.concatenate(out)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (tied values share their average rank)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.empty(len(x))
        order[np.argsort(x, kind="stable")] = np.arange(len(x))
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        return (np.bincount(inverse, weights=order) / counts)[inverse]

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def run_one(output_dir: Path, tiny: Path, data: str, loss: str, seed: int) -> dict:
    """Train one arm with one seed and judge it (in this process)."""
    train, held_out = data_files(output_dir, tiny)[data]
    name = f"{data}_{loss}_{seed}".replace(" + ", "+").replace(" ", "")
    run_dir = output_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    command = ["tune", "run", "recipes/lora_dpo_single_device.py", "--config", CONFIG, f"output_dir={run_dir}",
               f"seed={seed}", f"prepare.out_dir={tiny}", f"checkpointer.checkpoint_dir={tiny}/sft_model",
               f"dataset.data_files={train}", f"eval_dataset.data_files={held_out}", "eval_samples=0",
               *LOSSES[loss]]  # fmt: skip
    log_file = output_dir / f"{name}.log"
    with open(log_file, "w") as log:
        subprocess.run(command, cwd=REPO_ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    series: dict = defaultdict(dict)
    for path in (run_dir / "logs").glob("*.txt"):
        read_disk_log(path, series)
    warned = [line for line in log_file.read_text().splitlines() if WARNING in line]
    warned_at = int(warned[0].split(" over steps ")[1].split(" ")[0].split("-")[1]) if warned else None
    sft = load_tiny_checkpoint(tiny / "sft_model", run_dir / "scratch")
    dpo = load_tiny_checkpoint(latest_checkpoint(run_dir), run_dir / "scratch")
    before, after, _ = evaluate(dpo, sft, held_out, beta=5.0)
    pairs = _dataset(train)
    fell = chosen_logps_per_token(dpo, pairs) - chosen_logps_per_token(sft, pairs)
    ches = np.array([p["ches"] for p in json.loads((output_dir / f"ches_{data}.json").read_text())])
    change = series["displacement/chosen_logp_change"]
    return {
        "data": data, "loss": loss, "seed": seed, "warned_at": warned_at, "seconds": seconds,
        "accuracy": after["accuracy"], "reward_sft": before["reward"], "reward": after["reward"],
        "chosen_change_end": change[max(change)], "chosen_change_min": min(change.values()),
        "rejected_change_end": series["displacement/rejected_logp_change"][max(change)],
        "below_reference_end": series["displacement/chosen_below_reference"][max(change)],
        "chosen_rewards": {str(k): v for k, v in sorted(series["rewards/chosen"].items())},
        "chosen_change": {str(k): v for k, v in sorted(change.items())},
        "rejected_change": {str(k): v for k, v in sorted(series["displacement/rejected_logp_change"].items())},
        "ches_spearman": spearman(ches, -fell),  # high CHES -> the chosen log-prob fell further: positive
        "chosen_fall": (-fell).tolist(),
    }  # fmt: skip


def ches_of(output_dir: Path, tiny: Path, data: str) -> None:
    """Every training pair's CHES under the SFT model (step 0), once per data kind."""
    path = output_dir / f"ches_{data}.json"
    if path.exists():
        return
    train, _ = data_files(output_dir, tiny)[data]
    pairs = _dataset(train)
    model = load_tiny_checkpoint(tiny / "sft_model", output_dir / "scratch")
    collate = make_collator(tiny_tokenizer().pad_id, model.max_seq_len, datasets={"d": pairs})
    values = audit_pairs(model, pairs, collate, 64, torch.device("cpu"))
    path.write_text(json.dumps(audit_report(pairs, values, None)["per_pair"]) + "\n")


def _in_subprocess(output_dir: Path, data: str, loss: str, seed: int) -> None:
    command = [sys.executable, "-m", "dpo_components.tools.displacement_study", "--output-dir", str(output_dir),
               "--one", data, loss, str(seed)]  # fmt: skip
    subprocess.run(command, check=True, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def write_results(results: list[dict], output_dir: Path, command: str) -> Path:
    (output_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"`{command}` ({len(results)} runs; change = log-prob per token against the SFT model, on the "
             "training pairs of the last logged step)", "",
             "| data | loss | seeds | warning fired | at step | chosen change, end | chosen change, lowest | "
             "rejected change, end | chosen below the reference, end | held-out accuracy | true reward SFT -> DPO "
             "| Spearman(CHES, chosen fall) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    groups: dict = defaultdict(list)
    for r in results:
        groups[(r["data"], r["loss"])].append(r)
    span = lambda values, f: (f"{f(min(values))} .. {f(max(values))}" if len(values) > 1  # noqa: E731
                              else f(values[0]))  # fmt: skip
    for (data, loss), runs in groups.items():
        fired = [r["warned_at"] for r in runs if r["warned_at"] is not None]
        lines.append(
            f"| {data} | {loss} | {len(runs)} | {len(fired)} of {len(runs)} | "
            f"{span(fired, str) if fired else '-'} | "
            f"{span([r['chosen_change_end'] for r in runs], lambda v: f'{v:+.2f}')} | "
            f"{span([r['chosen_change_min'] for r in runs], lambda v: f'{v:+.2f}')} | "
            f"{span([r['rejected_change_end'] for r in runs], lambda v: f'{v:+.2f}')} | "
            f"{span([r['below_reference_end'] for r in runs], lambda v: f'{v:.2f}')} | "
            f"{span([r['accuracy'] for r in runs], lambda v: f'{v:.3f}')} | "
            f"{statistics.mean(r['reward_sft'] for r in runs):.3f} -> "
            f"{span([r['reward'] for r in runs], lambda v: f'{v:.3f}')} | "
            f"{span([r['ches_spearman'] for r in runs], lambda v: f'{v:+.2f}')} |"
        )
    lines += ["", pooled_ches_correlation(results, output_dir)]
    path = output_dir / "results.md"
    path.write_text("\n".join(lines) + "\n")
    plot(results, output_dir / "displacement.png")
    return path


def pooled_ches_correlation(results: list[dict], output_dir: Path) -> str:
    """Spearman(CHES, chosen fall) over the pairs of every data kind together, per loss and seed: whether the pairs
    that look alike to the SFT model are the ones whose chosen log-prob falls, across data sets."""
    kinds = list(dict.fromkeys(r["data"] for r in results))
    if len(kinds) < 2:
        return ""
    ches = {kind: [p["ches"] for p in json.loads((output_dir / f"ches_{kind}.json").read_text())] for kind in kinds}
    by_arm: dict = defaultdict(list)
    for loss, seed in dict.fromkeys((r["loss"], r["seed"]) for r in results):
        runs = [r for r in results if r["loss"] == loss and r["seed"] == seed]
        if {r["data"] for r in runs} == set(kinds):
            x = np.concatenate([ches[r["data"]] for r in runs])
            by_arm[loss].append(spearman(x, np.concatenate([r["chosen_fall"] for r in runs])))
    cells = [f"{loss} {min(v):+.2f} .. {max(v):+.2f}" for loss, v in by_arm.items()]
    return f"Spearman(CHES, chosen fall) over the pairs of {' and '.join(kinds)} together, per seed: {'; '.join(cells)}"


def plot(results: list[dict], path: Path) -> None:
    """The chosen (solid) and rejected (dashed) log-prob change per token over the steps, a panel per data kind,
    a colour per loss, a line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["data"] for r in results))
    colours = dict(zip(LOSSES, ("tab:red", "tab:blue", "tab:green")))
    figure, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for r in (r for r in results if r["data"] == kind):
            for key, style in (("chosen_change", "-"), ("rejected_change", "--")):
                steps = [int(k) for k in r[key]]
                label = f"{r['loss']} ({key.split('_')[0]})" if r["seed"] == min(x["seed"] for x in results) else None
                ax.plot(steps, list(r[key].values()), style, color=colours[r["loss"]], alpha=0.7, label=label)
            if r["warned_at"] is not None:
                ax.axvline(r["warned_at"], color=colours[r["loss"]], linestyle=":", alpha=0.5)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(f"{kind}: log-prob change per token vs the SFT model")
        ax.set_xlabel("step (dotted: the warning fired)")
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", nargs="+", default=["near-duplicates", "demo"])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs/displacement")
    parser.add_argument("--one", nargs=3, metavar=("DATA", "LOSS", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    tiny = REPO_ROOT / "outputs/tiny"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.one:
        data, loss, seed = args.one
        result = run_one(args.output_dir, tiny, data, loss, int(seed))
        (args.output_dir / f"{data}_{loss}_{seed}.json".replace(" ", "")).write_text(json.dumps(result) + "\n")
        return
    prepare_tiny(tiny)  # the demo's SFT model and data (built once, on first use)
    for data in args.data:
        ches_of(args.output_dir, tiny, data)
    arms = [(d, loss, s) for d in args.data for loss in args.losses for s in args.seeds]
    done = lambda d, loss, s: (args.output_dir / f"{d}_{loss}_{s}.json".replace(" ", "")).exists()  # noqa: E731
    with ThreadPoolExecutor(args.jobs) as pool:  # a run already done (an interrupted study) is kept
        list(pool.map(lambda arm: _in_subprocess(args.output_dir, *arm), [a for a in arms if not done(*a)]))
    results = [json.loads((args.output_dir / f"{d}_{loss}_{s}.json".replace(" ", "")).read_text())
               for d, loss, s in arms]  # fmt: skip
    command = "python -m dpo_components.tools.displacement_study " + " ".join(sys.argv[1:])
    print((write_results(results, args.output_dir, command.strip())).read_text())


if __name__ == "__main__":
    main()
