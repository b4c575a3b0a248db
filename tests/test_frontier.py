"""The demo's pass/fail rule, the label-noise switch and the reward/KL frontier script (its --quick preset)."""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT

from dpo_components.tiny import synthetic
from dpo_components.tiny.prepare import noisy_train_file
from dpo_components.tiny.task_eval import demo_failures, load_tiny_checkpoint, sampled_metrics, task_prompts
from dpo_components.tools.frontier import _overrides, sweep, win_rate


def test_demo_fails_on_each_shortfall_and_names_it():
    before = {"accuracy": 0.5, "reward": 0.0, "words": 0.998}
    assert demo_failures(before, {"accuracy": 0.95, "reward": 0.4, "words": 0.99}) == []
    problems = demo_failures(before, {"accuracy": 0.85, "reward": 0.25, "words": 0.9})
    assert [p.split()[0] for p in problems] == ["held-out", "true", "only"]
    assert "0.850 < 0.9" in problems[0] and "up by 0.250 < 0.3" in problems[1] and "0.900 of sampled" in problems[2]


def test_noisy_train_file_flips_that_share_of_the_prepared_pairs(tiny_setup):
    clean = [json.loads(line) for line in (tiny_setup / "data/train.jsonl").read_text().splitlines()]
    noisy = [json.loads(line) for line in noisy_train_file(tiny_setup, 0.25).read_text().splitlines()]
    assert len(noisy) == len(clean) == 256
    flipped = [(a, b) for a, b in zip(clean, noisy) if a != b]
    assert len(flipped) == 64
    assert all(b["chosen"] == a["rejected"] and b["rejected"] == a["chosen"] for a, b in flipped)


def test_noisy_runs_train_on_flipped_pairs_with_the_loss_they_name(tiny_setup):
    runs = {r.name: r for r in sweep(quick=False, noise=0.2)}
    assert {n for n, r in runs.items() if r.noise} == {"dpo_beta5_noise20", "cdpo_beta5_noise20", "rdpo_beta5_noise20"}
    settings = {"tiny": str(tiny_setup), "repo_root": str(REPO_ROOT), "checkpoint_every": 20, "overrides": {}}
    args = _overrides(runs["rdpo_beta5_noise20"], settings, tiny_setup / "run")
    assert f"dataset.data_files={tiny_setup}/data/train_noise0.2.jsonl" in args
    assert "eval_dataset.data_files=" + str(tiny_setup / "data/eval.jsonl") in args  # judged on clean pairs
    assert args[-3:] == ["loss._component_=dpo_components.losses.RobustDPOLoss", "loss.beta=5.0",
                         "loss.label_smoothing=0.2"]  # fmt: skip
    nll = _overrides(runs["preferred-ft_steps"], settings, tiny_setup / "run")
    assert "~loss.label_smoothing" in nll and "save_every_n_steps=20" in nll  # NLLLoss takes no label_smoothing


def test_a_model_ties_its_own_samples(tiny_setup):
    sft = load_tiny_checkpoint(tiny_setup / "sft_model", tiny_setup / "scratch")
    prompts = task_prompts(16)
    point, rows = sampled_metrics(sft, sft, prompts, seed=2)
    assert point["kl"] == 0.0  # log pi - log ref of one model is exactly 0
    rewards = [synthetic.sentiment_reward(row["policy"]) for row in rows]
    assert win_rate(sft, sft, prompts, 1.0, rewards) == 0.5  # same seed, same samples: all ties
    assert win_rate(sft, sft, prompts, 1.0, [2.0] * 16) == 0.0  # a reward above any response's always wins
    assert win_rate(sft, sft, prompts, 1.0, [-2.0] * 16) == 1.0


def test_quick_frontier_trains_each_method_from_yaml_and_plots(tiny_setup, tmp_path):
    out = tmp_path / "frontier"
    command = [sys.executable, "-m", "dpo_components.tools.frontier", "--quick", "--noise", "0", "--jobs", "2",
               "--tiny-dir", str(tiny_setup), "--output-dir", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert len((tiny_setup / "data/train.jsonl").read_text().splitlines()) == 256  # the given setup used as it is
    points = json.loads((out / "results.json").read_text())["points"]
    runs = {(p["method"], p["noise"], p["step"]) for p in points}
    assert runs == {("SFT", 0.0, 0), ("DPO", 0.0, 8), ("Preferred-FT", 0.0, 4), ("Preferred-FT", 0.0, 8)}
    sft = next(p for p in points if p["method"] == "SFT")
    assert sft["kl"] == 0.0
    for p in points:
        assert set(p["win_rate"]) == {"0.5", "1.0"} and all(0 <= w <= 1 for w in p["win_rate"].values())
        assert 0 <= p["well_formed"] <= 1 and -1 <= p["reward"] <= 1
    # each run trained the loss it names, through the recipe and its YAML config
    assert "DPOLoss(beta=5.0" in (out / "dpo_beta5.log").read_text()
    assert "NLLLoss" in (out / "preferred-ft_steps.log").read_text()
    table = (out / "results.md").read_text()
    assert "| Preferred-FT | steps | 0 | 4 |" in table and "Best true reward with KL <= 1 nats" in table
    assert (out / "frontier.png").stat().st_size > 10_000
