"""The DPO paper's Figure 2 in miniature: true reward against KL from the reference, per method, on the tiny task.

    OMP_NUM_THREADS=1 python -m dpo_components.tools.frontier           # the default sweep, about 30 min on 2 cores
    OMP_NUM_THREADS=1 python -m dpo_components.tools.frontier --quick   # a smoke run, about 2 minutes
    OMP_NUM_THREADS=1 python -m dpo_components.tools.frontier --study kto  # KTO against DPO and IPO, ~40 min
    OMP_NUM_THREADS=1 python -m dpo_components.tools.frontier --study online  # offline vs online vs iterative

Every run is the LoRA recipe from the tiny YAML config (``tune run recipes/lora_dpo_single_device.py --config
recipe_configs/tiny/lora_dpo_single_device.yaml`` + overrides), started from the demo's SFT model on its data, in a
process of its own, ``--jobs`` at a time. A run differs from the others only by its loss (and the label noise of its
training pairs); methods are swept over beta, Preferred-FT (SFT on the chosen responses, ``NLLLoss``) over steps.

For every checkpoint, on the same fresh prompts (``dpo_components.tiny.task_eval``):

- the true reward of responses sampled at temperature 1 and the sequence-level KL(pi || SFT), estimated by
  ``mean_i [log pi(y_i|x_i) - log SFT(y_i|x_i)]`` over the policy's own samples (Fig. 2 left);
- fluency (share of task words, share of well-formed samples) and the held-out implicit-reward accuracy;
- the win rate against the SFT model's samples at temperature 1, for sampling temperatures ``temperatures``:
  a win when the true reward of the policy's response beats the SFT model's response to the same prompt, a tie
  counting half (Fig. 2 right, with the task's reward as the judge instead of GPT-4).

Writes ``results.json``, ``results.md`` (tables and the commands) and ``frontier.png`` to ``--output-dir``. Label
noise (``--noise``, a share of training pairs with chosen and rejected swapped) adds DPO, cDPO and robust DPO runs
on noisy pairs, still judged by the true reward.

``--study kto`` runs KTO (``recipe_configs/tiny/lora_kto_single_device.yaml``) instead: over beta on the same pairs
unrolled into unpaired rows, on a 1:4 desirable:undesirable subset with and without the paper's weight correction,
and on rows where no prompt has both labels (:func:`dpo_components.tiny.prepare.unpaired_train_file`), with a second
seed where the differences are small, and DPO and IPO over beta beside them.

``--study online`` runs the online recipe (``recipes/online_dpo_single_device.py``,
``recipe_configs/tiny/online_dpo_single_device.yaml``: 8 rounds of 128 prompts x 4 samples, 8 steps each) against
offline DPO on the demo's pairs, at the same beta and about the same optimizer steps (64 vs 62) and reward calls
(4096 vs the 4000 labels of the 2000 pairs): online DPO (reference: the start), iterative DPO (reference: the
previous round's policy), online DPO with 2 samples per prompt (half the reward calls), and online DPO trained on
a reward that can be gamed (:func:`~dpo_components.tiny.synthetic.keyword_reward`, at beta 5 and 1, beside the
true reward at beta 1), all judged by the true reward; a checkpoint every 16 steps of each run is judged, and a
second seed of the three main methods.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dpo_components.checkpointing import step_dirs
from dpo_components.tiny import synthetic
from dpo_components.tiny.prepare import noisy_train_file, prepare_tiny, unpaired_train_file
from dpo_components.tiny.task_eval import (
    heldout_preference,
    load_tiny_checkpoint,
    sampled_metrics,
    sampled_responses,
    task_prompts,
)

RECIPE = "recipes/lora_dpo_single_device.py"
ONLINE_RECIPE = "recipes/online_dpo_single_device.py"
# --quick: 8 steps of 8 pairs, the recipe's own eval on 32 pairs (the frontier judges the checkpoints itself)
QUICK_OVERRIDES = {"epochs": 1, "max_steps_per_epoch": 8, "batch_size": 8, "eval_dataset.split": "train[:32]"}
CONFIG = "recipe_configs/tiny/lora_dpo_single_device.yaml"
KTO_CONFIG = "recipe_configs/tiny/lora_kto_single_device.yaml"
ONLINE_CONFIG = "recipe_configs/tiny/online_dpo_single_device.yaml"
LOSSES = "dpo_components.losses"


@dataclass
class Run:
    """One training run: a method at one setting, on clean or noisy pairs (or on unpaired rows: ``data``)."""

    method: str
    loss: dict[str, Any]
    setting: str  # what the frontier sweeps for this method, as shown ("beta=5", "steps")
    noise: float = 0.0
    overrides: dict[str, Any] = field(default_factory=dict)
    config: str = CONFIG
    data: str = ""  # "": the prepared pairs (unrolled by the KTO config); else an unpaired_train_file variant
    seed: int = 0
    recipe: str = RECIPE
    judge_every: int | None = None  # judge the checkpoints at multiples of this step (and the last); None: all

    @property
    def name(self) -> str:
        noise = f"_noise{round(self.noise * 100)}" if self.noise else ""
        seed = f"_seed{self.seed}" if self.seed else ""
        name = f"{self.method}_{self.setting}{noise}{seed}".replace("=", "").replace(" ", "").replace(".", "p")
        return name.replace(":", "to").replace("+", "").replace(",", "").lower()


def _beta_runs(method: str, component: str, betas: list[float], noise: float = 0.0, **loss: Any) -> list[Run]:
    return [Run(method, {"_component_": f"{LOSSES}.{component}", "beta": b, **loss}, f"beta={b:g}", noise)
            for b in betas]  # fmt: skip


def kto_sweep() -> list[Run]:
    """The KTO study (27 runs): KTO over beta on the unrolled pairs; at beta 5 on 1:4 data without and with the
    weight correction (Eq. 8: lambda_D n_D / lambda_U n_U in [1, 4/3], so desirable_weight 4), and on rows where no
    prompt has both labels; the 1:4 data at beta 1; APO-zero-unpaired; DPO and IPO over beta as in the fig2 sweep
    (DPO also at beta 3 and 7, near KTO's KL); a second seed where points lie close together."""

    def kto(method: str, beta: float = 5.0, data: str = "", seed: int = 0, loss: str = "KTOLoss", **args: Any) -> Run:
        overrides: dict[str, Any] = {"seed": seed}
        if data == "imbalanced_1to4":
            overrides["batch_size"] = 40  # its 2500 rows in the same 62 steps as the other runs
        return Run(method, {"_component_": f"{LOSSES}.{loss}", "beta": beta, **args}, f"beta={beta:g}",
                   overrides=overrides, config=KTO_CONFIG, data=data, seed=seed)  # fmt: skip

    def variants(seed: int) -> list[Run]:
        return [kto("KTO 1:4", data="imbalanced_1to4", seed=seed),
                kto("KTO 1:4 + weights", data="imbalanced_1to4", seed=seed, desirable_weight=4.0),
                kto("KTO no pairs", data="no_pairs", seed=seed)]  # fmt: skip

    def dpo(beta: float, seed: int = 0, method: str = "DPO", component: str = "DPOLoss") -> Run:
        return Run(method, {"_component_": f"{LOSSES}.{component}", "beta": beta}, f"beta={beta:g}",
                   overrides={"seed": seed}, seed=seed)  # fmt: skip

    # the order the runs start in (the order they were added in: a sweep into the same output dir reuses
    # finished runs); DPO at beta 3 and 7 fills its curve where KTO's points are
    return [kto("KTO"), *variants(0), *(kto("KTO", beta) for beta in (1.0, 2.0, 10.0)), dpo(5.0, seed=1),
            kto("KTO", seed=1), *variants(1), kto("KTO", 0.5), dpo(3.0), dpo(7.0), kto("KTO", 1.0, seed=1),
            kto("KTO", 2.0, seed=1), dpo(10.0, seed=1), kto("KTO 1:4", 1.0, data="imbalanced_1to4"),
            *(dpo(beta) for beta in (1.0, 2.0, 5.0, 10.0)),
            *(dpo(beta, method="IPO", component="IPOLoss") for beta in (0.25, 1.0, 4.0)),
            kto("APO-zero unpaired", loss="APOZeroUnpairedLoss")]  # fmt: skip


def online_sweep() -> list[Run]:
    """The online study (module docstring): offline, online and iterative DPO at beta 5 with two seeds, online DPO
    with K = 2, and online DPO on the keyword reward against the true one at beta 5 and at beta 1 (further out,
    where a gameable reward can be gamed)."""
    dpo = {"_component_": f"{LOSSES}.DPOLoss", "beta": 5.0}

    def offline(seed: int = 0) -> Run:
        return Run("offline DPO", dpo, "beta=5", overrides={"seed": seed, "save_every_n_steps": 16}, seed=seed,
                   judge_every=16)  # fmt: skip

    def run(method: str, seed: int = 0, beta: float = 5.0, **overrides: Any) -> Run:
        return Run(method, {**dpo, "beta": beta}, f"beta={beta:g}", overrides={"seed": seed, **overrides},
                   config=ONLINE_CONFIG, recipe=ONLINE_RECIPE, seed=seed, judge_every=16)  # fmt: skip

    iterative = {"online.reference": "previous_round"}
    keyword = {"reward_fn.function": "dpo_components.tiny.synthetic.keyword_reward"}
    return [offline(), run("online DPO"), run("iterative DPO", **iterative),
            run("online DPO, K=2", **{"online.samples_per_prompt": 2}), run("online DPO, keyword reward", **keyword),
            offline(1), run("online DPO", 1), run("iterative DPO", 1, **iterative),
            run("online DPO", beta=1.0), run("online DPO, keyword reward", beta=1.0, **keyword)]  # fmt: skip


def reward_calls(run: dict[str, Any], step: int, repo_root: Path) -> int:
    """Reward calls behind a checkpoint: offline, the 2 labels of every training pair (4000 for the 2000 pairs; the
    pairs redrawn for a small reward gap cost more); online, rounds begun x prompts x samples per prompt."""
    if run["recipe"] != ONLINE_RECIPE:
        return 4000
    cfg = OmegaConf.merge(OmegaConf.load(repo_root / run["config"]).online,
                          {k.removeprefix("online."): v for k, v in run["overrides"].items()
                           if k.startswith("online.")})  # fmt: skip
    rounds = -(-step // cfg.steps_per_round)
    return rounds * cfg.prompts_per_round * cfg.samples_per_prompt


def sweep(quick: bool, noise: float) -> list[Run]:
    """The runs of the default sweep (or of ``--quick``): every method of Fig. 2 and the noisy-label comparison."""
    if quick:
        runs = _beta_runs("DPO", "DPOLoss", [5.0])
        runs.append(Run("Preferred-FT", {"_component_": f"{LOSSES}.NLLLoss"}, "steps"))
        return runs + (_beta_runs("DPO", "DPOLoss", [5.0], noise) if noise else [])
    runs = [
        *_beta_runs("DPO", "DPOLoss", [1.0, 2.0, 5.0, 10.0]),
        *_beta_runs("cDPO", "DPOLoss", [2.0, 10.0], label_smoothing=0.1),
        *_beta_runs("IPO", "IPOLoss", [0.25, 1.0, 4.0]),
        *_beta_runs("SimPO", "SimPOLoss", [2.0, 10.0], gamma=1.0),
        Run("Preferred-FT", {"_component_": f"{LOSSES}.NLLLoss"}, "steps"),
    ]
    if noise:
        runs += [
            *_beta_runs("DPO", "DPOLoss", [5.0], noise),
            *_beta_runs("cDPO", "DPOLoss", [5.0], noise, label_smoothing=noise),
            *_beta_runs("rDPO", "RobustDPOLoss", [5.0], noise, label_smoothing=noise),
        ]
    return runs


def _overrides(run: Run, settings: dict[str, Any], run_dir: Path) -> list[str]:
    tiny = Path(settings["tiny"])
    if run.data:
        train = unpaired_train_file(tiny, run.data)
    else:
        train = noisy_train_file(tiny, run.noise) if run.noise else tiny / "data/train.jsonl"
    data_key = "prompt_dataset" if run.recipe == ONLINE_RECIPE else "dataset"
    values = {"output_dir": run_dir, "prepare.out_dir": tiny, "checkpointer.checkpoint_dir": tiny / "sft_model",
              f"{data_key}.data_files": train, "eval_dataset.data_files": tiny / "data/eval.jsonl",
              "reference.cache_dir": tiny / "reference_cache", "eval_samples": 0,
              "save_every_n_steps": settings["checkpoint_every"] if run.setting == "steps" else None,
              **settings["overrides"], **run.overrides}  # fmt: skip
    args = [f"{k}={'null' if v is None else v}" for k, v in values.items()]
    shipped = OmegaConf.load(Path(settings["repo_root"]) / run.config).loss
    args += [f"~loss.{k}" for k in shipped if k not in run.loss]  # the run's loss replaces the config's
    return args + [f"loss.{k}={v}" for k, v in run.loss.items()]


def evaluate_checkpoint(
    checkpoint: Path, sft: Any, tiny: Path, prompts: list[str], temperatures: list[float], sft_rewards: list[float]
) -> dict[str, Any]:
    """Reward, KL, fluency and held-out accuracy at temperature 1, and the win rate against SFT per temperature."""
    policy = load_tiny_checkpoint(checkpoint, checkpoint.parent / "scratch")
    point, rows = sampled_metrics(policy, sft, prompts)
    point.update(text_figures([row["policy"] for row in rows]))
    # the implicit reward beta * log(pi/ref) ranks a pair the same for any beta > 0, so beta=1 gives the accuracy
    point["accuracy"] = heldout_preference(policy, sft, tiny / "data/eval.jsonl", beta=1.0)["accuracy"]
    point["win_rate"] = {str(t): win_rate(policy, sft, prompts, t, sft_rewards) for t in temperatures}
    return point


def text_figures(texts: list[str]) -> dict[str, float]:
    """The samples' keyword reward (what the online study's gamed run optimises) and their length in words."""
    return {"keyword_reward": sum(map(synthetic.keyword_reward, texts)) / len(texts),
            "response_words": sum(len(t.split()) for t in texts) / len(texts)}  # fmt: skip


def win_rate(policy: Any, sft: Any, prompts: list[str], temperature: float, sft_rewards: list[float]) -> float:
    """Share of prompts where the policy's response (at ``temperature``) has a higher true reward than the SFT
    model's (``sft_rewards``, sampled at temperature 1); ties count half."""
    responses = sampled_responses(policy, prompts, seed=2, temperature=temperature)
    rewards = [synthetic.sentiment_reward(r) for r in responses]
    return sum((a > b) + 0.5 * (a == b) for a, b in zip(rewards, sft_rewards)) / len(prompts)


def run_and_evaluate(run: Run, settings: dict[str, Any], output_dir: Path) -> list[dict[str, Any]]:
    """Train one run through the recipe, then judge each of its checkpoints (this is one worker process)."""
    tiny, run_dir = Path(settings["tiny"]), output_dir / run.name
    shutil.rmtree(run_dir, ignore_errors=True)
    command = ["tune", "run", run.recipe, "--config", run.config, *_overrides(run, settings, run_dir)]
    start = time.perf_counter()
    with open(output_dir / f"{run.name}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=settings["repo_root"])
    seconds = time.perf_counter() - start
    sft = load_tiny_checkpoint(tiny / "sft_model", run_dir / "scratch")
    prompts = task_prompts(settings["prompts"])
    _, sft_rows = sampled_metrics(sft, sft, prompts)
    sft_rewards = [synthetic.sentiment_reward(row["policy"]) for row in sft_rows]
    points = []
    checkpoints = list(reversed(step_dirs(run_dir)))  # oldest first
    for checkpoint in checkpoints:
        step = int(checkpoint.name.removeprefix("step_"))
        if run.judge_every and step % run.judge_every and checkpoint != checkpoints[-1]:
            continue
        point = evaluate_checkpoint(checkpoint, sft, tiny, prompts, settings["temperatures"], sft_rewards)
        points.append({**asdict(run), "name": run.name, "step": step, "train_seconds": round(seconds, 1), **point})
    return points


def sft_point(settings: dict[str, Any]) -> dict[str, Any]:
    """The SFT model itself: KL 0, its own reward, and its win rate against itself per temperature."""
    tiny = Path(settings["tiny"])
    sft = load_tiny_checkpoint(tiny / "sft_model", Path(settings["output_dir"]) / "scratch")
    prompts = task_prompts(settings["prompts"])
    point, rows = sampled_metrics(sft, sft, prompts)
    rewards = [synthetic.sentiment_reward(row["policy"]) for row in rows]
    point.update(text_figures([row["policy"] for row in rows]))
    point["accuracy"] = heldout_preference(sft, sft, tiny / "data/eval.jsonl", beta=1.0)["accuracy"]  # ties: 0.5
    point["win_rate"] = {str(t): win_rate(sft, sft, prompts, t, rewards) for t in settings["temperatures"]}
    return {"method": "SFT", "setting": "", "noise": 0.0, "name": "sft", "step": 0, **point}


def _judged_by(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: settings[k] for k in ("tiny", "prompts", "temperatures", "overrides", "checkpoint_every")}


def _finished_points(run: Run, settings: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The points of ``run`` from an earlier sweep into the same ``output_dir`` judged the same way, else None."""
    result = Path(settings["output_dir"]) / f"{run.name}.json"
    if result.exists() and (done := json.loads(result.read_text()))["judged_by"] == _judged_by(settings):
        return done["points"]
    return None


def _worker(index: int, settings_file: Path) -> list[dict[str, Any]]:
    """Run ``settings["runs"][index]`` in a process of its own, or reuse its results from an earlier sweep into the
    same ``output_dir`` when the run and the judging settings are the same (a killed sweep picks up there)."""
    settings = json.loads(settings_file.read_text())
    run = Run(**settings["runs"][index])
    if (finished := _finished_points(run, settings)) is not None:
        return finished
    result = Path(settings["output_dir"]) / f"{run.name}.json"
    command = [sys.executable, "-m", "dpo_components.tools.frontier", "--worker", str(index), str(settings_file)]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=settings["repo_root"])
    return json.loads(result.read_text())["points"]


def best_per_method(points: list[dict[str, Any]], kl_bound: float) -> dict[str, dict[str, Any]]:
    """Per method (clean pairs, first seed), the checkpoint with the highest true reward among those with
    KL <= ``kl_bound`` (the lowest-KL one when none is that close)."""
    best = {}
    main = [p for p in points if not p["noise"] and not p.get("seed")]
    for method in dict.fromkeys(p["method"] for p in main):
        mine = [p for p in main if p["method"] == method]
        close = [p for p in mine if p["kl"] <= kl_bound]
        best[method] = max(close, key=lambda p: p["reward"]) if close else min(mine, key=lambda p: p["kl"])
    return best


def write_markdown(points: list[dict[str, Any]], settings: dict[str, Any], path: Path) -> None:
    temps, online = settings["temperatures"], settings.get("study") == "online"
    runs = dict.fromkeys((r.get("recipe", RECIPE), r["config"]) for r in settings["runs"])
    if len({recipe for recipe, _ in runs}) == 1:
        how = f"`tune run {next(iter(runs))[0]} --config` " + " or ".join(f"`{c}`" for _, c in runs)
    else:
        how = " or ".join(f"`tune run {recipe} --config {c}`" for recipe, c in runs)
    lines = [f"# Reward vs KL on the tiny sentiment task ({settings['prompts']} prompts)", "",
             f"`{settings['command']}` ({settings['wall_time']}); every run: {how} + the loss and data below.",
             ""]  # fmt: skip
    extra = "reward calls | keyword reward | words per response | " if online else ""
    lines += [
             f"| method | setting | {'' if online else 'label noise | '}step | true reward | KL (nats) | {extra}"
             "held-out accuracy | task words | well-formed | " + " | ".join(f"win rate T={t:g}" for t in temps) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * (len(temps) + (3 if online else 1))]  # fmt: skip
    for p in points:
        wins = " | ".join(f"{p['win_rate'][str(t)]:.3f}" for t in temps)
        method = p["method"]
        setting = p["setting"] + (f", seed {p['seed']}" if p.get("seed") else "")
        if online:
            calls = reward_calls(p, p["step"], Path(settings["repo_root"])) if p["method"] != "SFT" else 0
            middle = f"{p['step']} | {p['reward']:.3f} | {p['kl']:.2f} | {calls} | {p['keyword_reward']:.2f} | " \
                     f"{p['response_words']:.1f}"  # fmt: skip
        else:
            middle = f"{p['noise']:g} | {p['step']} | {p['reward']:.3f} | {p['kl']:.2f}"
        lines.append(f"| {method} | {setting} | {middle} | {p['accuracy']:.3f} | {p['words']:.3f} | "
                     f"{p['well_formed']:.3f} | {wins} |")  # fmt: skip
    bound = settings["kl_bound"]
    lines += ["", f"Best true reward with KL <= {bound:g} nats, per method:", "",
              "| method | setting | step | true reward | KL |", "|---|---|---|---|---|"]  # fmt: skip
    for method, p in best_per_method(points, bound).items():
        lines.append(f"| {method} | {p['setting']} | {p['step']} | {p['reward']:.3f} | {p['kl']:.2f} |")
    lines += seed_spread_table(points)
    path.write_text("\n".join(lines) + "\n")


def seed_spread_table(points: list[dict[str, Any]]) -> list[str]:
    """Each run trained with a second seed (LoRA init and data order) beside its first-seed run: the noise level."""
    final = {}
    for p in points:  # the last checkpoint of each run
        key = (p["method"], p["setting"], p["noise"], p.get("seed", 0))
        if key not in final or p["step"] > final[key]["step"]:
            final[key] = p
    rows = [(final[(m, s, n, 0)], p) for (m, s, n, seed), p in final.items() if seed and (m, s, n, 0) in final]
    if not rows:
        return []
    lines = ["", "Seed spread (the same run with seed 0 and seed 1: LoRA init and data order; the last checkpoint):",
             "", "| method | setting | true reward (seed 0 / 1) | KL (seed 0 / 1) | held-out accuracy (seed 0 / 1) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for a, b in rows:
        lines.append(f"| {a['method']} | {a['setting']} | {a['reward']:.3f} / {b['reward']:.3f} | "
                     f"{a['kl']:.2f} / {b['kl']:.2f} | {a['accuracy']:.3f} / {b['accuracy']:.3f} |")  # fmt: skip
    return lines


def plot_frontier(points: list[dict[str, Any]], settings: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    methods = list(dict.fromkeys(p["method"] for p in points))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for method in methods:
        for noise, marker in ((0.0, "o"), (settings["noise"], "x"))[: 2 if settings["noise"] else 1]:
            mine = [p for p in points if p["method"] == method and p["noise"] == noise and not p.get("seed")]
            mine.sort(key=lambda p: p["kl"])
            if mine and (noise == 0.0 or settings["noise"]):
                label = method + (f" ({noise:.0%} flipped labels)" if noise else "")
                left.plot([p["kl"] for p in mine], [p["reward"] for p in mine], marker=marker, color=colors[method],
                          linestyle="-" if not noise else ":", label=label)  # fmt: skip
        second = [p for p in points if p["method"] == method and p.get("seed")]
        if second:  # other seeds: hollow markers, no line
            left.scatter([p["kl"] for p in second], [p["reward"] for p in second], facecolors="none",
                         edgecolors=colors[method], label=f"{method}, seed 1")  # fmt: skip
    left.set_xscale("symlog", linthresh=1.0)  # linear below 1 nat, where the well-behaved runs sit
    left.set(xlabel="KL(policy || SFT), nats per response (linear below 1, log above)",
             ylabel="true reward of samples (T=1)", title="Reward vs KL (DPO paper Fig. 2 left)")  # fmt: skip
    if settings.get("study") == "kto":
        left.set_title("Reward vs KL: KTO on unpaired rows, DPO and IPO on pairs")
    if settings.get("study") == "online":
        left.set_title("Reward vs KL: offline, online and iterative DPO (checkpoints every 16 steps)")
    left.legend(fontsize=7, ncol=2)
    temps = settings["temperatures"]
    for method, p in best_per_method(points, settings["kl_bound"]).items():
        label = method + (f" ({p['setting']}, step {p['step']}, KL {p['kl']:.2g})" if method != "SFT" else "")
        right.plot(temps, [p["win_rate"][str(t)] for t in temps], marker="o", color=colors[method], label=label)
    right.axhline(0.5, color="grey", linewidth=0.8)
    right.set(xlabel="sampling temperature", ylabel="win rate vs SFT samples (T=1), true reward",
              title=f"Win rate (Fig. 2 right; best run with KL <= {settings['kl_bound']:g})")  # fmt: skip
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 runs of 8 steps of 8 pairs, 32 prompts (a smoke test)")
    parser.add_argument("--study", choices=("fig2", "kto", "online"), default="fig2",
                        help="fig2: the DPO paper's methods (default); kto: KTO against DPO and IPO; online: "
                             "offline vs online vs iterative DPO")  # fmt: skip
    parser.add_argument("--noise", type=float, default=0.2, help="share of flipped training pairs (0: no noisy runs)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--kl-bound", type=float, default=1.0, help="KL budget (nats) for 'best reward' and Fig. right")
    parser.add_argument("--output-dir", type=Path)
    parser.add_argument("--tiny-dir", type=Path, help="a prepare_tiny directory (default: the demo's outputs/tiny)")
    parser.add_argument("--tables-only", action="store_true", help="write tables and figure of the finished runs")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        index, settings_file = int(args.worker[0]), Path(args.worker[1])
        settings = json.loads(settings_file.read_text())
        run = Run(**settings["runs"][index])
        points = run_and_evaluate(run, settings, Path(settings["output_dir"]))
        result = {"run": asdict(run), "judged_by": _judged_by(settings), "points": points}
        (Path(settings["output_dir"]) / f"{run.name}.json").write_text(json.dumps(result) + "\n")
        return

    repo_root = Path(__file__).resolve().parents[2]
    output_dir = (
        args.output_dir or repo_root / {"quick": "outputs/frontier_quick", "fig2": "outputs/frontier",
                                        "kto": "outputs/frontier_kto", "online": "outputs/frontier_online"}[
                                            "quick" if args.quick else args.study]
    ).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.tiny_dir and not (args.tiny_dir / "manifest.json").exists():
        parser.error(f"--tiny-dir {args.tiny_dir} is not a prepared directory (python -m dpo_components.tiny.prepare)")
    tiny = args.tiny_dir or prepare_tiny(repo_root / "outputs/tiny")  # a given directory is used as it is
    if args.study != "fig2" and args.quick:
        parser.error(f"--quick is a smoke run of the fig2 study; the {args.study} study has no quick preset")
    runs = {"kto": kto_sweep, "online": online_sweep}.get(args.study, lambda: sweep(args.quick, args.noise))()
    settings = {
        "tiny": str(tiny.resolve()), "repo_root": str(repo_root), "output_dir": str(output_dir),
        "noise": args.noise if args.study == "fig2" else 0.0, "study": args.study,
        "overrides": QUICK_OVERRIDES if args.quick else {},  # else the config's schedule
        "checkpoint_every": 4 if args.quick else 20,
        "prompts": 32 if args.quick else 256, "temperatures": [0.5, 1.0] if args.quick else [0.25, 0.5, 0.75, 1.0],
        "kl_bound": args.kl_bound, "runs": [asdict(r) for r in runs],
        "command": "python -m dpo_components.tools.frontier " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    settings_file = output_dir / "settings.json"
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")
    if args.tables_only:  # tables and figure from the runs finished so far
        finished = [output_dir / f"{r.name}.json" for r in runs if (output_dir / f"{r.name}.json").exists()]
        per_run = [json.loads(f.read_text())["points"] for f in finished]
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            reused = sum(_finished_points(r, settings) is not None for r in runs)
            per_run = list(pool.map(lambda i: _worker(i, settings_file), range(len(runs))))
    points = [sft_point(settings), *(p for run_points in per_run for p in run_points)]
    seconds = time.perf_counter() - start
    if args.tables_only:
        settings["wall_time"] = "tables of the runs finished so far"
    else:
        earlier = f"; {reused} of the {len(runs)} runs were finished by an earlier sweep into this directory"
        settings["wall_time"] = f"{seconds:.0f} s" + (earlier if reused else "")
    (output_dir / "results.json").write_text(json.dumps({"settings": settings, "points": points}, indent=2) + "\n")
    write_markdown(points, settings, output_dir / "results.md")
    figure = plot_frontier(points, settings, output_dir / "frontier.png")
    print((output_dir / "results.md").read_text())
    print(f"{len(per_run)} runs in {seconds:.0f} s; figure {figure}")


if __name__ == "__main__":
    main()
