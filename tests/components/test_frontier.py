"""The demo's pass/fail rule, the label-noise switch and the reward/KL frontier script (its --quick preset)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from dpo_components.tiny import synthetic
from dpo_components.tiny.prepare import noisy_train_file, unpaired_train_file
from dpo_components.tiny.task_eval import demo_failures, load_tiny_checkpoint, sampled_metrics, task_prompts
from dpo_components.tools.frontier import (
    _overrides,
    kto_sweep,
    seed_spread_table,
    sweep,
    win_rate,
    write_markdown,
)


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


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_unpaired_study_files_hold_the_imbalance_and_no_shared_prompt(tiny_setup):
    pairs = _rows(tiny_setup / "data/train.jsonl")
    imbalanced = _rows(unpaired_train_file(tiny_setup, "imbalanced_1to4"))
    desirable = [r for r in imbalanced if r["label"]]
    assert len(imbalanced) == 320 and len(desirable) == 64  # all 256 rejected, the chosen of a quarter
    assert sorted(r["completion"] for r in desirable) == sorted(p["chosen"] for p in pairs[:64])
    assert sorted(r["completion"] for r in imbalanced if not r["label"]) == sorted(p["rejected"] for p in pairs)
    no_pairs = _rows(unpaired_train_file(tiny_setup, "no_pairs"))
    assert len(no_pairs) == 512  # one row per pair of twice the training pairs (the first 256 are train.jsonl's)
    labels = {}
    for row in no_pairs:
        labels.setdefault(row["prompt"], set()).add(row["label"])
    assert all(len(seen) == 1 for seen in labels.values())  # no prompt has both a desirable and an undesirable row
    assert 0.3 < sum(r["label"] for r in no_pairs) / 512 < 0.7
    first = {(p["prompt"], p["chosen"] if p["prompt"] in labels and True in labels[p["prompt"]] else p["rejected"])
             for p in pairs}  # fmt: skip
    assert first <= {(r["prompt"], r["completion"]) for r in no_pairs}


def test_kto_study_runs_the_kto_config_on_its_data_with_equal_steps(tiny_setup):
    runs = {r.name: r for r in kto_sweep()}
    settings = {"tiny": str(tiny_setup), "repo_root": str(REPO_ROOT), "checkpoint_every": 20, "overrides": {}}
    weighted = _overrides(runs["kto1to4weights_beta5"], settings, tiny_setup / "run")
    assert f"dataset.data_files={tiny_setup}/data/train_imbalanced_1to4.jsonl" in weighted
    assert "batch_size=40" in weighted and "~loss.undesirable_weight" in weighted
    assert weighted[-3:] == ["loss._component_=dpo_components.losses.KTOLoss", "loss.beta=5.0",
                             "loss.desirable_weight=4.0"]  # fmt: skip
    assert runs["kto1to4weights_beta5"].config.endswith("lora_kto_single_device.yaml")
    # the full-size data (2000 pairs): 2500 imbalanced rows in batches of 40 and 4000 unrolled rows in batches of
    # 64 both give the DPO config's 62 steps of 32 pairs
    assert 2500 // 40 == 4000 // 64 == 2000 // 32 == 62
    seed1 = _overrides(runs["dpo_beta5_seed1"], settings, tiny_setup / "run")
    assert "seed=1" in seed1 and f"dataset.data_files={tiny_setup}/data/train.jsonl" in seed1
    assert {r.seed for r in runs.values() if r.method.startswith("KTO 1:4")} == {0, 1}


def _point(method, setting, reward, kl, seed=0, noise=0.0, step=62):
    return {"method": method, "setting": setting, "noise": noise, "seed": seed, "step": step, "reward": reward,
            "kl": kl, "accuracy": 0.99, "words": 1.0, "well_formed": 0.9, "win_rate": {"1.0": 0.7}}  # fmt: skip


def test_study_tables_show_the_second_seed_beside_the_first(tmp_path):
    settings = {"prompts": 256, "temperatures": [1.0], "command": "frontier --study kto", "wall_time": "1 s",
                "kl_bound": 1.0, "runs": [{"config": "recipe_configs/tiny/lora_kto_single_device.yaml"}]}  # fmt: skip
    points = [{**_point("SFT", "", 0.01, 0.0), "step": 0}, _point("DPO", "beta=5", 0.46, 1.19),
              _point("DPO", "beta=5", 0.07, 0.03, noise=0.2), _point("KTO", "beta=5", 0.40, 0.5),
              _point("KTO", "beta=5", 0.30, 0.4, step=20), _point("KTO", "beta=5", 0.35, 0.45, seed=1),
              _point("DPO", "beta=5", 0.44, 1.1, seed=1), _point("KTO", "beta=2", 0.5, 0.7, seed=1)]  # fmt: skip
    write_markdown(points, settings, tmp_path / "results.md")
    table = (tmp_path / "results.md").read_text()
    assert "--config` `recipe_configs/tiny/lora_kto_single_device.yaml` + the loss and data" in table
    assert "| KTO | beta=5, seed 1 | 0 | 62 | 0.350 |" in table
    assert "| KTO | beta=5 | 0.400 / 0.350 | 0.50 / 0.45 |" in table  # the last checkpoint, beside seed 0's
    assert "| DPO | beta=5 | 0.460 / 0.440 |" in table  # not the noisy-label run
    assert "beta=2 | 0.5" not in table  # a second seed without a first one has no spread row
    best = table.split("Best true reward")[1].split("Seed spread")[0]
    assert "| KTO | beta=5 | 62 | 0.400 |" in best  # the best run of a method is taken from the first seed
    assert seed_spread_table(points[:5]) == []  # no second seed: no table


def test_a_model_ties_its_own_samples(tiny_setup):
    sft = load_tiny_checkpoint(tiny_setup / "sft_model", tiny_setup / "scratch")
    prompts = task_prompts(16)
    point, rows = sampled_metrics(sft, sft, prompts, seed=2)
    assert point["kl"] == 0.0  # log pi - log ref of one model is exactly 0
    rewards = [synthetic.sentiment_reward(row["policy"]) for row in rows]
    assert win_rate(sft, sft, prompts, 1.0, rewards) == 0.5  # same seed, same samples: all ties
    assert win_rate(sft, sft, prompts, 1.0, [2.0] * 16) == 0.0  # a reward above any response's always wins
    assert win_rate(sft, sft, prompts, 1.0, [-2.0] * 16) == 1.0


@pytest.mark.recipe
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
