"""Plot DPO runs from their metric logs.

    python -m dpo_components.tools.plot outputs/tiny_lora_dpo                # -> outputs/tiny_lora_dpo/metrics.png
    python -m dpo_components.tools.plot RUN_A RUN_B --out compare.png        # one figure, the runs overlaid
    python -m dpo_components.tools.plot RUN --metrics loss rewards/accuracies eval/samples/kl

A run directory is a recipe's ``output_dir`` (or any folder above its logs). The metrics come from torchtune's
``DiskLogger`` files (``log_*.txt``: ``Step N | name:value ...``) and, when ``tensorboard`` is installed, from
TensorBoard event files; several files (a resumed run writes a new one) are merged by step. Each panel shows a
metric and its held-out ``eval/`` counterpart; panels without data are left out.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

Series = dict[str, dict[int, float]]  # metric name -> {step: value}

# Panel title -> the metrics drawn in it (each also with its eval/ counterpart when that was logged).
PANELS: dict[str, list[str]] = {
    "loss": ["loss"],
    "reward accuracy": ["rewards/accuracies"],
    "reward margin": ["rewards/margins"],
    "rewards (chosen, rejected)": ["rewards/chosen", "rewards/rejected"],
    "log-probs (chosen, rejected)": ["logps/chosen", "logps/rejected"],
    "change since the reference, nats/token": ["displacement/chosen_logp_change", "displacement/rejected_logp_change"],
    "share of pairs": ["displacement/chosen_below_reference", "displacement/both_below_reference",
                       "displacement/saturated"],
    "samples: KL(policy || reference)": ["eval/samples/kl"],
    "samples: true reward": ["eval/samples/reward", "eval/samples/reference_reward"],
    "learning rate": ["lr"],
    "tokens/s": ["tokens_per_second"],
}


def read_disk_log(path: Path, series: Series) -> None:
    """Add the ``Step N | name:value name:value`` lines of a torchtune DiskLogger file to ``series``."""
    for line in path.read_text(errors="replace").splitlines():
        head, _, body = line.partition(" | ")
        if not head.startswith("Step ") or not head[5:].strip().isdigit():
            continue
        step = int(head[5:])
        for item in body.split():
            name, _, value = item.rpartition(":")
            try:
                series[name][step] = float(value)
            except ValueError:
                continue


def read_event_file(path: Path, series: Series) -> None:
    """Add the scalars of a TensorBoard event file (torchtune writes them as new-style tensor summaries)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for tag in tags.get("scalars", []):
        for event in events.Scalars(tag):
            series[tag][event.step] = float(event.value)
    for tag in tags.get("tensors", []):
        for event in events.Tensors(tag):
            value = tensor_util.make_ndarray(event.tensor_proto)
            if value.size == 1 and value.dtype.kind == "f":
                series[tag][event.step] = float(value.reshape(()))


def read_run(run_dir: str | Path) -> Series:
    """Every metric logged under ``run_dir``, as {name: {step: value}}."""
    series: Series = defaultdict(dict)
    for path in sorted(Path(run_dir).rglob("log_*.txt")):  # timestamped names: a resumed run's file sorts later
        read_disk_log(path, series)
    event_files = sorted(Path(run_dir).rglob("events.out.tfevents.*"))
    if event_files:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            print(f"note: {run_dir} has TensorBoard event files; pip install tensorboard to read them")
        else:
            for path in event_files:
                read_event_file(path, series)
    return dict(series)


def panels_for(metrics: list[str] | None, runs: dict[str, Series]) -> dict[str, list[str]]:
    """The panels to draw: the chosen metrics one per panel, or the default panels; only those with data."""
    wanted = {name: [name] for name in metrics} if metrics else PANELS
    logged = {name for series in runs.values() for name in series}
    panels = {}
    for title, names in wanted.items():
        names = [n for base in names for n in (base, f"eval/{base}") if n in logged]
        if names:
            panels[title] = names
    missing = [m for m in metrics or [] if m not in panels]
    if missing:
        raise SystemExit(f"not logged in any run: {missing}; logged: {sorted(logged)}")
    return panels


def plot_runs(runs: dict[str, Series], out: str | Path, metrics: list[str] | None = None) -> Path:
    """Draw the runs' metrics into one PNG (a grid of panels, one line per run and metric); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels_for(metrics, runs)
    if not panels:
        raise SystemExit(f"no metrics found in {list(runs)} (looked for log_*.txt and TensorBoard event files)")
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for ax, (title, names) in zip(axes.flat, panels.items()):
        for label, series in runs.items():
            for name in names:
                if name not in series:
                    continue
                steps = sorted(series[name])
                style = "o--" if name.startswith("eval/") and len(steps) < 30 else "-"
                line_label = name if len(runs) == 1 else f"{label}: {name}"
                ax.plot(steps, [series[name][s] for s in steps], style, label=line_label, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(", ".join(runs), fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot DPO runs from their metric logs (one PNG).")
    parser.add_argument("run_dirs", nargs="+", help="run output directories (or folders holding their logs)")
    parser.add_argument("--metrics", nargs="+", help="metric names, one panel each (default: the DPO panels)")
    parser.add_argument("--out", help="PNG path (default: RUN_DIR/metrics.png for one run, runs.png for several)")
    args = parser.parse_args(argv)
    runs = {str(d): read_run(d) for d in args.run_dirs}
    out = args.out or (Path(args.run_dirs[0]) / "metrics.png" if len(runs) == 1 else Path("runs.png"))
    path = plot_runs(runs, out, args.metrics)
    drawn = [name for names in panels_for(args.metrics, runs).values() for name in names]
    print(f"wrote {path}: {', '.join(drawn)}")


if __name__ == "__main__":
    main()
