"""Run a sweep of recipe variants and report what each costs and whether it still learns.

    python -m dpo_components.tools.experiments recipe_configs/experiments/quant_sweep.yaml [--output-dir DIR]

A sweep file names a recipe and config per variant (``defaults`` apply to all) and the ``overrides`` that make
each variant (any ``key=value`` the recipe takes). Every variant runs in its own process, for the same steps on
the same data and seed, and writes its metrics through the recipe's disk logger; the runner then writes
``results.json``, ``results.md`` and ``results.png`` to the sweep's output directory: per variant the peak memory,
tokens/s, final train loss, held-out preference accuracy and reward margin, and the difference from the
``baseline: true`` row of the same recipe and config. A variant with ``requires: cuda`` or ``requires: sm89`` is
skipped, with the reason in the table, on a machine without that. ``--jobs N`` runs N variants at once (their
speed and memory figures then share the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dpo_components.models.quantization import requirement_met
from dpo_components.tools import plot

METRICS = ("peak_memory_gib", "tokens_per_second", "train_loss", "eval_accuracy", "eval_margin")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def read_metric_log(log_dir: Path) -> dict[int, dict[str, float]]:
    """torchtune DiskLogger lines ``Step N | name:value ...`` -> {step: {name: value}}."""
    rows: dict[int, dict[str, float]] = {}
    for name, values in plot.read_run(log_dir).items():
        for step, value in values.items():
            rows.setdefault(step, {})[name] = value
    return rows


def summarise(rows: dict[int, dict[str, float]]) -> dict[str, float]:
    train = [row for _, row in sorted(rows.items()) if "loss" in row]
    evals = [row for _, row in sorted(rows.items()) if "eval/rewards/accuracies" in row]
    speeds = [row["tokens_per_second"] for row in train[1:]] or [row["tokens_per_second"] for row in train]
    return {
        "peak_memory_gib": max(row["peak_memory_gib"] for row in train),
        "tokens_per_second": statistics.median(speeds),
        "train_loss": statistics.mean(row["loss"] for row in train[-3:]),
        "eval_accuracy": evals[-1]["eval/rewards/accuracies"] if evals else float("nan"),
        "eval_margin": evals[-1]["eval/rewards/margins"] if evals else float("nan"),
    }


def run_variant(variant: dict[str, Any], out_dir: Path, repo_root: Path) -> dict[str, Any]:
    result = {"name": variant["name"], "recipe": variant["recipe"], "config": variant["config"],
              "baseline": bool(variant.get("baseline", False)), "overrides": variant.get("overrides", {})}  # fmt: skip
    ok, reason = requirement_met(variant.get("requires"))
    if not ok:
        return {**result, "status": f"skipped: {reason}"}
    overrides = [k if k.startswith("~") else f"{k}={'null' if v is None else v}"  # "~key" removes a key
                 for k, v in variant.get("overrides", {}).items()]  # fmt: skip
    command = [sys.executable, variant["recipe"], "--config", variant["config"], *overrides, f"output_dir={out_dir}"]
    shutil.rmtree(out_dir, ignore_errors=True)  # each variant is a fresh run (a recipe refuses an earlier run's dir)
    start = time.perf_counter()
    process = subprocess.run(command, cwd=repo_root, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})  # fmt: skip
    result["seconds"] = round(time.perf_counter() - start, 1)
    (out_dir.parent / f"{out_dir.name}.log").write_text(process.stdout + process.stderr)
    if process.returncode != 0:
        last = [line for line in process.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return {**result, "status": f"failed: {last[0][:200]}"}
    return {**result, "status": "ok", **summarise(read_metric_log(out_dir / "logs"))}


def add_deltas(results: list[dict[str, Any]]) -> None:
    """Each ok row gets ``delta_<metric>`` against the baseline row of the same recipe and config."""
    baselines = {(r["recipe"], r["config"]): r for r in results if r["baseline"] and r["status"] == "ok"}
    for row in results:
        base = baselines.get((row["recipe"], row["config"]))
        if row["status"] == "ok" and base is not None:
            for metric in METRICS:
                row[f"delta_{metric}"] = row[metric] - base[metric]


def write_markdown(results: list[dict[str, Any]], path: Path, title: str) -> None:
    lines = [f"# {title}", "",
             "| variant | peak memory GiB (delta) | tokens/s (delta) | final train loss (delta) | held-out accuracy "
             "(delta) | held-out margin (delta) | s | status |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in results:
        if row["status"] != "ok":
            lines.append(f"| {row['name']} | | | | | | | {row['status']} |")
            continue
        cells = []
        for metric, fmt in zip(METRICS, (".3f", ".0f", ".4f", ".3f", ".3f")):
            delta = row.get(f"delta_{metric}")
            shown = f"{row[metric]:{fmt}}"
            cells.append(shown if delta is None or row["baseline"] else f"{shown} ({delta:+{fmt}})")
        lines.append(f"| {row['name']}{' (baseline)' if row['baseline'] else ''} | " + " | ".join(cells)
                     + f" | {row['seconds']} | ok |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def write_plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok"]
    panels = (("peak_memory_gib", "peak memory (GiB)"), ("tokens_per_second", "tokens / s"),
              ("eval_accuracy", "held-out preference accuracy"))  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.45 * len(ok) + 2), sharey=True)
    names = [r["name"] for r in ok]
    for ax, (metric, label) in zip(axes, panels):
        colors = ["tab:gray" if r["baseline"] else "tab:blue" for r in ok]
        ax.barh(names, [r[metric] for r in ok], color=colors)
        ax.set_xlabel(label)
        if metric == "eval_accuracy":
            ax.axvline(0.5, color="tab:red", linestyle="--", linewidth=1, label="chance")
            ax.set_xlim(0, 1)
            ax.legend(loc="lower right")
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sweep(
    sweep_file: str | Path, output_dir: str | Path | None = None, repo_root: str | Path = ".", jobs: int = 1
) -> Path:
    """Run every variant of ``sweep_file`` (``jobs`` at a time, each its own process) and write the results."""
    repo_root = Path(repo_root).resolve()
    sweep = OmegaConf.to_container(OmegaConf.load(sweep_file), resolve=True)
    out = Path(output_dir or sweep["output_dir"])
    out = out if out.is_absolute() else repo_root / out
    out.mkdir(parents=True, exist_ok=True)
    defaults = sweep.get("defaults", {})

    def run(spec: dict[str, Any]) -> dict[str, Any]:
        variant = {**defaults, **spec, "overrides": {**defaults.get("overrides", {}), **spec.get("overrides", {})}}
        print(f"[sweep] {variant['name']} ...", flush=True)
        result = run_variant(variant, out / _slug(variant["name"]), repo_root)
        print(f"[sweep] {variant['name']}: {result['status']}", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(run, sweep["variants"]))
    add_deltas(results)
    title = sweep.get("title", Path(sweep_file).stem)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, out / "results.md", title)
    write_plot(results, out / "results.png", title)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a sweep of recipe variants and write results.md/json/png.")
    parser.add_argument("sweep_file")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--jobs", type=int, default=1, help="variants run at once (their speeds then share the CPU)")
    args = parser.parse_args()
    out = run_sweep(args.sweep_file, args.output_dir, jobs=args.jobs)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'}, results.json, results.png")


if __name__ == "__main__":
    main()
