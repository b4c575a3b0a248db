"""Online / iterative DPO: pairs from scored samples, the rewards and their errors, the round's reference (the start
or the previous round's policy), round 0 on a fixed sample file equal to the offline recipe, and resume after
kill -9 mid-round and mid-sampling to the same weights as a run never stopped."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from helpers import logged
from helpers import run_lora_recipe as run_offline
from omegaconf import OmegaConf
from safetensors.torch import load_file

from dpo_components import online
from dpo_components.data import collate_preference_batch, preference_dataset
from dpo_components.data.formats import PreferenceDataError
from dpo_components.files import record_in_manifest
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.online import OnlineSettings, build_pairs, prompt_dataset, round_prompt_indices
from dpo_components.online.rewards import HFRewardModel, RewardError, TextReward, score
from dpo_components.samples import NucleusLogits
from dpo_components.settings import ConfigError
from dpo_components.tiny import synthetic
from dpo_components.tiny.task_eval import load_tiny_checkpoint
from recipes.online_dpo_single_device import OnlineDPORecipeSingleDevice

CONFIG = "recipe_configs/tiny/online_dpo_single_device.yaml"
# a small run: 3 rounds of 16 prompts x 4 samples, 2 steps of 8 pairs each, a checkpoint every step
SMALL = {"online.rounds": 3, "online.prompts_per_round": 16, "online.steps_per_round": 2, "online.max_new_tokens": 24,
         "batch_size": 8, "save_every_n_steps": 1, "eval_dataset": None}  # fmt: skip


def samples(*ids):
    return [{"ids": list(i)} for i in ids]


# ------------------------------------------------------------------------------------------- pure parts


def test_pairs_best_vs_worst_and_all_pairs_by_hand():
    rewards = [[0.5, 1.0, -1.0, 1.0], [0.2, 0.2], [0.0, 0.3, 0.1], [1.0, 0.0], [0.9, -0.5, 0.1]]
    responses = [samples([1], [2], [3], [4]), samples([1], [2]), samples([1], [2], [3]), samples([7], [7]),
                 samples([1], [], [2])]  # fmt: skip
    # prompt 0: the first of the two best (1) vs the worst (2); prompt 1: a tie, dropped; prompt 3: same tokens;
    # prompt 4: the empty response (the lowest score) is left out
    assert build_pairs(rewards, responses, "best_vs_worst", 0.0) == [(0, 1, 2), (2, 1, 0), (4, 0, 2)]
    assert build_pairs(rewards, responses, "best_vs_worst", 0.3) == [(0, 1, 2), (4, 0, 2)]  # 0.3 is not above 0.3
    everything = build_pairs(rewards, responses, "all_pairs", 0.0)
    assert everything == [(0, 0, 2), (0, 1, 0), (0, 1, 2), (0, 3, 0), (0, 3, 2), (2, 1, 0), (2, 1, 2), (2, 2, 0),
                          (4, 0, 2)]  # fmt: skip
    assert build_pairs(rewards, responses, "all_pairs", 0.6) == [(0, 0, 2), (0, 1, 2), (0, 3, 2), (4, 0, 2)]


def test_round_prompts_cover_every_prompt_before_repeating_and_depend_only_on_seed_and_round():
    rounds = [round_prompt_indices(10, 4, seed=3, round_index=r) for r in range(5)]
    flat = [i for r in rounds for i in r]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert rounds[3] == round_prompt_indices(10, 4, seed=3, round_index=3)
    assert rounds[0] != round_prompt_indices(10, 4, seed=4, round_index=0)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    fixed = lambda: probs.log().expand(2, 3, 4).clone()  # noqa: E731  [batch, positions, vocab]
    logits = _nucleus(fixed, 0.75)(None)
    assert logits.shape == (2, 1, 4)  # the last position only: what generate reads
    assert torch.isfinite(logits[0, -1]).tolist() == [False, True, False, True]  # 0.5 + 0.3 >= 0.75
    assert torch.equal(logits[torch.isfinite(logits)], fixed()[:, -1:][torch.isfinite(logits)])
    assert torch.isfinite(_nucleus(fixed, 0.4)(None)[0, -1]).tolist() == [False, True, False, False]
    # at temperature 2 the distribution is flatter: 0.75 needs three tokens
    assert torch.isfinite(_nucleus(fixed, 0.75, temperature=2.0)(None)[0, -1]).sum() == 3


def _nucleus(fn, top_p, temperature=1.0):
    class Wrapped(torch.nn.Module):
        def forward(self, *args, **kwargs):
            return fn()

    return NucleusLogits(Wrapped(), top_p, temperature)


def test_sampling_with_top_p_and_top_k_stays_inside_the_nucleus(tiny_setup, tokenizer):
    """Sampled through torchtune's generate: with top_k=1 every row is the greedy response; top_p small as well."""
    model = load_tiny_checkpoint(tiny_setup / "sft_model", tiny_setup / "scratch")
    prompts = prompt_dataset(tokenizer, source="json", data_files=str(tiny_setup / "data/eval.jsonl"))
    ids = [prompts[0]["prompt_ids"]] * 2
    settings = partial(OnlineSettings, rounds=1, prompts_per_round=1, samples_per_prompt=3, steps_per_round=1,
                       max_new_tokens=12)  # fmt: skip
    greedy = online.sample_round(model, ids, tokenizer, settings(top_k=1), seed=0)
    nucleus = online.sample_round(model, ids, tokenizer, settings(top_p=1e-6), seed=5)
    free = online.sample_round(model, ids, tokenizer, settings(), seed=0)
    texts = lambda rounds: {s["text"] for row in rounds for s in row}  # noqa: E731
    assert len(texts(greedy)) == 1 and texts(greedy) == texts(nucleus)
    assert len(texts(free)) > 1
    assert online.sample_round(model, ids, tokenizer, settings(), seed=0) == free  # seeded


def test_text_rewards_and_their_errors():
    assert TextReward("dpo_components.tiny.synthetic.sentiment_reward")([[]], ["great ."]) == [1.0]
    with_prompt = TextReward(lambda prompt, response: len(prompt) + len(response))
    assert with_prompt([[{"role": "user", "content": "ab"}]], ["xyz"]) == [5]
    prompts = [[{"role": "user", "content": "the plot was"}]] * 2

    def broken(response):
        if "dull" in response:
            raise KeyError("no such word")
        return 1.0

    with pytest.raises(RewardError, match=r"round 3: reward .*broken raised KeyError.* on response 1 'dull \.' to "
                                          r"prompt 'the plot was'"):  # fmt: skip
        score(TextReward(broken), prompts, ["great .", "dull ."], "round 3")
    with pytest.raises(RewardError, match=r"round 0: .* scored response 1 'b' .* as nan, not a finite number"):
        score(TextReward(lambda r: {"a": 1.0, "b": math.nan}[r]), prompts, ["a", "b"], "round 0")
    with pytest.raises(RewardError, match="returned 1 scores for 2 responses"):
        score(lambda p, r: [0.0], prompts, ["a", "b"], "round 0")
    with pytest.raises(TypeError, match=r"must take \(response\) or \(prompt, response\)"):
        TextReward(lambda a, b, c: 0.0)


def test_a_hugging_face_reward_model_scores_batches_as_one_by_one(tiny_family, tmp_path):
    """HFRewardModel on a tiny Qwen2.5 sequence classifier (random weights, the released chat template): padded
    batches score every response as the model does alone, unpadded."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    source = tiny_family("qwen2_5")
    config = AutoConfig.from_pretrained(source, num_labels=1)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "rm")
    reward = HFRewardModel(str(tmp_path / "rm"), batch_size=3)
    prompts = [[{"role": "user", "content": p}] for p in ("the plot was", "the music", "the film felt very")]
    responses = ["great .", "dull and slow . the cast was odd .", "fine"]
    batched = reward(prompts * 2, responses * 2)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm")
    for i, (p, r) in enumerate(zip(prompts * 2, responses * 2)):
        text = tokenizer.apply_chat_template([*p, {"role": "assistant", "content": r}], tokenize=False)
        assert "<|im_start|>assistant\n" + r in text
        with torch.no_grad():
            alone = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
        assert batched[i] == pytest.approx(alone, rel=1e-4, abs=1e-5), i
    assert len(set(round(b, 4) for b in batched[:3])) == 3


def test_online_settings_refuse_what_cannot_run():
    base = {"rounds": 1, "prompts_per_round": 4, "samples_per_prompt": 2, "steps_per_round": 1}
    ok = OnlineSettings.from_config(OmegaConf.create(base))
    assert ok.pair_rule == "best_vs_worst" and ok.reference == "start"
    for change, message in [({"samples_per_prompt": 1}, "samples_per_prompt must be >= 2"),
                            ({"pair_rule": "best"}, "pair_rule must be one of"),
                            ({"reference": "sft"}, "reference must be one of"),
                            ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
                            ({"top_k": 0}, "top_k must be a whole number >= 1 or null"),
                            ({"rounds": 0}, "rounds must be a whole number >= 1"),
                            ({"sample_per_prompt": 4}, "unknown keys"),
                            ({"samples_file": "/nonexistent.jsonl"}, "does not exist")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            OnlineSettings.from_config(OmegaConf.create({**base, **change}))
    with pytest.raises(ConfigError, match="missing"):
        OnlineSettings.from_config(OmegaConf.create({"rounds": 2}))


def test_prompt_dataset_reads_prompt_rows_and_preference_rows(tokenizer, tmp_path):
    rows = [{"prompt": "the plot was"}, {"prompt": [{"role": "user", "content": "the cast felt"}], "system": "be kind"},
            {"prompt": "the film was", "chosen": "great .", "rejected": "dull ."},
            {"chosen": [{"role": "user", "content": "the music"}, {"role": "assistant", "content": "great ."}],
             "rejected": [{"role": "user", "content": "the music"}, {"role": "assistant", "content": "dull ."}]}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = prompt_dataset(tokenizer, source="json", data_files=str(path))
    last_turns = [d["messages"][-1]["content"] for d in data]
    assert last_turns == ["the plot was", "the cast felt", "the film was", "the music"]
    assert data[1]["messages"][0] == {"role": "system", "content": "be kind"}
    pairs = preference_dataset(tokenizer, source="json", data_files=str(path), split="train[2:3]", max_length=96)
    assert data[2]["prompt_ids"] == pairs[0]["prompt_ids"]  # the same chat format as the preference data
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(PreferenceDataError, match=r"prompts.jsonl .*line 2.*missing 'prompt'"):
        prompt_dataset(tokenizer, source="json", data_files=str(path))


def test_fixed_samples_name_the_bad_line(tokenizer, tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"prompt": "the plot was", "responses": ["great .", "dull ."]}) + "\n"
                    + json.dumps({"prompt": "the plot was", "responses": ["great ."]}) + "\n")  # fmt: skip
    with pytest.raises(ValueError, match=r"samples.jsonl line 2: 'responses' must be a list of two or more"):
        online.fixed_samples(path, tokenizer, 96)


# ----------------------------------------------------------------------------------------------- the recipe


def online_cfg(tiny_setup, out, **overrides):
    cfg = OmegaConf.load(REPO_ROOT / CONFIG)
    base = {"output_dir": str(out), "prepare": None, "eval_samples": 0, "log_every_n_steps": 1,
            "checkpointer": {"checkpoint_dir": str(tiny_setup / "sft_model")},
            "prompt_dataset": {"data_files": str(tiny_setup / "data/train.jsonl")},
            "eval_dataset": {"data_files": str(tiny_setup / "data/eval.jsonl"), "split": "train[:16]"}}  # fmt: skip
    dotlist = [f"{k}={'null' if v is None else v}" for k, v in overrides.items()]
    return OmegaConf.merge(cfg, base, OmegaConf.from_dotlist(dotlist))


def run_online(cfg):
    recipe = OnlineDPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()
    return recipe


def adapters(step_dir):
    return load_file(Path(step_dir) / "adapter/adapter_model.safetensors")


def assert_same_adapters(a, b):
    first, second = adapters(a), adapters(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.fixture(scope="module")
def online_run(tiny_setup, tmp_path_factory):
    """The small online run (reference: start), never stopped."""
    out = tmp_path_factory.mktemp("online") / "out"
    run_online(online_cfg(tiny_setup, out, **SMALL))
    return out


def round_pairs(out, r):
    directory = online.round_dir(out, r)
    rows = online.read_jsonl(directory / "samples.jsonl")
    rewards = [row["rewards"] for row in online.read_jsonl(directory / "scores.jsonl")]
    pairs = build_pairs(rewards, [row["responses"] for row in rows], "best_vs_worst", 0.0)
    return online.pairs_dataset(rows, pairs, f"round {r}"), load_file(directory / "reference_logps.safetensors")


@torch.no_grad()
def logps_of(model, dataset, pad_id):
    batch = collate_preference_batch([dataset[i] for i in range(len(dataset))], padding_idx=pad_id)
    return concatenated_logprobs(model, batch)


def test_a_round_writes_what_it_trained_on(online_run, tiny_setup, tokenizer):
    rows = logged(OmegaConf.create({"output_dir": str(online_run)}))
    assert sorted(s for s, r in rows.items() if "loss" in r) == [1, 2, 3, 4, 5, 6]
    for r, step in ((0, 0), (1, 2), (2, 4)):  # each round's figures are logged at the step it starts from
        summary = json.loads((online.round_dir(online_run, r) / "round.json").read_text())
        assert rows[step]["online/pairs"] == summary["figures"]["online/pairs"] >= 8
        assert -1 <= rows[step]["online/reward_min"] <= rows[step]["online/reward_mean"] <= 1
    assert rows[0]["online/kl_to_start"] == 0.0  # round 0 samples from the start model itself
    scored = online.read_jsonl(online.round_dir(online_run, 2) / "scores.jsonl")
    terms = [p - s for row in scored for p, s in zip(row["policy_logps"], row["start_logps"])]
    assert rows[4]["online/kl_to_start"] == pytest.approx(sum(terms) / len(terms))  # the Monte-Carlo estimate
    assert min(map(abs, terms)) > 0  # round 2 samples from a policy that moved (the estimate itself is noisy)
    # pairs.jsonl is a preference file; its rewards are the true rewards of its texts, chosen above rejected
    path = online.round_dir(online_run, 1) / "pairs.jsonl"
    for row in online.read_jsonl(path):
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert row["chosen_reward"] == synthetic.sentiment_reward(chosen) > synthetic.sentiment_reward(rejected)
    data = preference_dataset(tokenizer, source="json", data_files=str(path), max_length=128)
    trained, _ = round_pairs(online_run, 1)
    assert len(data) == len(trained) and data[0]["prompt_ids"] == trained[0]["prompt_ids"]


def test_the_reference_is_the_start_or_the_previous_rounds_policy(online_run, tiny_setup, tmp_path, tokenizer):
    sft = load_tiny_checkpoint(tiny_setup / "sft_model", tmp_path / "scratch")
    pairs, table = round_pairs(online_run, 1)
    start = logps_of(sft, pairs, tokenizer.pad_id)
    torch.testing.assert_close(table["chosen_logps"], start.chosen_logps, rtol=1e-5, atol=1e-4)  # online: the start

    iterative = tmp_path / "iterative"
    run_online(online_cfg(tiny_setup, iterative, **{**SMALL, "online.rounds": 2, "online.reference": "previous_round"}))
    pairs, table = round_pairs(iterative, 1)
    end_of_round_0 = load_tiny_checkpoint(iterative / "step_2", tmp_path / "scratch")  # the merged policy
    policy = logps_of(end_of_round_0, pairs, tokenizer.pad_id)
    torch.testing.assert_close(table["chosen_logps"], policy.chosen_logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(table["rejected_logps"], policy.rejected_logps, rtol=1e-5, atol=1e-4)
    assert (table["chosen_logps"] - logps_of(sft, pairs, tokenizer.pad_id).chosen_logps).abs().max() > 1e-2
    pairs0, table0 = round_pairs(iterative, 0)  # round 0 of iterative DPO: the policy is still the start model
    torch.testing.assert_close(table0["chosen_logps"], logps_of(sft, pairs0, tokenizer.pad_id).chosen_logps,
                               rtol=1e-5, atol=1e-4)  # fmt: skip


def test_round_0_on_a_fixed_sample_file_equals_the_offline_recipe(tiny_setup, recipe_cfg, tmp_path):
    """The first 32 pairs as a sample file of two responses per prompt: online round 0 trains the same pairs in the
    same order against the same (precomputed) reference, to the same adapters bit for bit."""
    rows = [json.loads(line) for line in (tiny_setup / "data/train.jsonl").read_text().splitlines()[:32]]
    sample_file = tmp_path / "samples.jsonl"
    sample_file.write_text("".join(json.dumps({"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]]})
                                   + "\n" for r in rows))  # fmt: skip
    same = {"batch_size": 8, "loss.beta": 0.1, "optimizer.lr": 3e-3, "lr_scheduler.num_warmup_steps": 10,
            "eval_dataset": None}  # fmt: skip
    offline = recipe_cfg(**same, max_steps_per_epoch=4, output_dir=str(tmp_path / "offline"),
                         **{"dataset.split": "train[:32]", "reference.mode": "precomputed",
                            "reference.cache_dir": str(tmp_path / "cache")})  # fmt: skip
    run_offline(offline)
    on = online_cfg(tiny_setup, tmp_path / "online", **same, **{"online.rounds": 1, "online.steps_per_round": 4,
                                                                 "online.samples_file": str(sample_file)})  # fmt: skip
    run_online(on)
    assert_same_adapters(tmp_path / "offline/step_4", tmp_path / "online/step_4")
    offline_rows, online_rows = logged(offline), logged(on)
    for step in (1, 2, 3, 4):
        assert online_rows[step]["loss"] == offline_rows[step]["loss"]
    assert online_rows[0]["online/pairs"] == 32 and "online/kl_to_start" not in online_rows[0]  # not its samples


def _launch(cfg, path):
    OmegaConf.save(cfg, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "recipes/online_dpo_single_device.py", "--config", str(path)]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def _kill_when(process, done, what):
    deadline = time.monotonic() + 300
    while not done():
        assert process.poll() is None and time.monotonic() < deadline, f"{what}: " + process.communicate()[0][-3000:]
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def test_kill_9_mid_round_and_mid_sampling_resumes_to_the_same_weights(online_run, tiny_setup, tmp_path):
    out = tmp_path / "killed"
    cfg = online_cfg(tiny_setup, out, **SMALL)
    _kill_when(_launch(cfg, tmp_path / "a.yaml"), lambda: (out / "step_3/manifest.json").exists(), "first run")
    assert not (out / "step_6").exists()  # killed in round 1's second step (or the sampling of round 2)
    resumed = OmegaConf.merge(cfg, {"resume_from_checkpoint": True})
    _kill_when(_launch(resumed, tmp_path / "b.yaml"), lambda: (out / "step_4/manifest.json").exists(), "resume")
    assert not (out / "step_6").exists()  # killed while round 2 samples (or trains its first step)
    run_online(resumed)
    assert_same_adapters(online_run / "step_6", out / "step_6")
    for name in ("samples.jsonl", "scores.jsonl", "reference_logps.safetensors"):
        assert (online.round_dir(out, 2) / name).read_bytes() == (online.round_dir(online_run, 2) / name).read_bytes()


def test_no_pair_in_a_round_is_a_named_skip_and_bad_rewards_stop_with_the_response(tiny_setup, tmp_path, caplog,
                                                                                   monkeypatch):
    cfg = online_cfg(tiny_setup, tmp_path / "flat", **{**SMALL, "online.rounds": 1,
                     "reward_fn._component_": "dpo_components.online.rewards.text_reward",
                     "reward_fn.function": "test_online_dpo.constant_reward"})  # fmt: skip
    recipe = run_online(cfg)
    assert recipe.progress.global_step == 0
    assert "round 0: 0 pairs, fewer than batch_size 8: no step this round" in caplog.text
    nan = tmp_path / "nan"
    cfg = online_cfg(tiny_setup, nan, **{**SMALL, "online.rounds": 1,
                                         "reward_fn.function": "test_online_dpo.nan_reward"})  # fmt: skip
    with pytest.raises(RewardError, match=r"round 0: reward .*nan_reward.* scored response \d+ '.*' .* as nan"):
        run_online(cfg)
    samples = (online.round_dir(nan, 0) / "samples.jsonl").read_bytes()  # kept; no checkpoint yet
    with pytest.raises(ConfigError, match="holds the rounds of an earlier run"):
        run_online(cfg)  # a fresh run does not delete them
    monkeypatch.setattr(sys.modules[__name__], "nan_reward", synthetic.sentiment_reward)  # the reward, fixed
    recipe = run_online(OmegaConf.merge(cfg, {"resume_from_checkpoint": True}))
    assert recipe.progress.global_step == 2 and (online.round_dir(nan, 0) / "samples.jsonl").read_bytes() == samples
    kto = online_cfg(tiny_setup, tmp_path / "kto")
    kto.loss = {"_component_": "dpo_components.losses.KTOLoss", "beta": 0.1}
    with pytest.raises(ConfigError, match="trains on unpaired rows"):
        run_online(kto)


def constant_reward(response: str) -> float:
    return 0.5


def nan_reward(response: str) -> float:
    return math.nan if "the" in response else 0.0


# ------------------------------------------------------------------ damaged round files (issue 45): never trained on


def _cut_in_half(path):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: len(lines) // 2]))  # at a line boundary: still valid JSON lines


def _edit_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # same size
    path.write_bytes(bytes(data))


def _made_again_after_the_checkpoint(directory):
    """samples.jsonl written again (other bytes, the same rows) and recorded: as a round made again on a GPU
    after a checkpoint inside it was saved."""
    rows = online.read_jsonl(directory / "samples.jsonl")
    (directory / "samples.jsonl").write_text("".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows))
    record_in_manifest(directory / "manifest.json", ["samples.jsonl"])


# damage to round 1's files inside the round, and whether the round restarts from step_2 or the file is made again
DAMAGE = {
    "samples cut to half its lines": (lambda d: _cut_in_half(d / "samples.jsonl"), True),
    "scores.jsonl deleted": (lambda d: (d / "scores.jsonl").unlink(), True),
    "inputs made again after the checkpoint": (_made_again_after_the_checkpoint, True),
    "round.json deleted": (lambda d: (d / "round.json").unlink(), False),
    "start-model table edited in place": (lambda d: _edit_one_byte(d / "reference_logps.safetensors"), False),
}


def _killed_inside_round_1(finished, out):
    """``finished``'s output dir as a kill after step 3 (inside round 1) leaves it: no step_4.., no round 2."""
    shutil.copytree(finished, out)
    for name in ("step_4", "step_5", "step_6", "rounds/round_002"):
        shutil.rmtree(out / name)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_round_files_inside_a_round_end_on_the_same_weights(online_run, tiny_setup, tmp_path, caplog, damage):
    """Issue 45: round 1's samples cut to 32 of 64 lines used to resume with "read 32 pairs" and train on them, and a
    deleted round.json re-scored the round with the mid-round policy. Now a damaged input (or inputs made again since
    the checkpoint) is named and the round restarts from its start (step_2); what follows from the inputs or the
    start model is made again in place. Either way the run ends on the uninterrupted run's weights, bit for bit."""
    out = tmp_path / "damaged"
    _killed_inside_round_1(online_run, out)
    hurt, restarts = DAMAGE[damage]
    hurt(online.round_dir(out, 1))
    run_online(online_cfg(tiny_setup, out, **SMALL, resume_from_checkpoint=True))
    restarted = f"round 1 restarts from {out}/step_2 (the checkpoints after it stay" in caplog.text
    assert restarted == restarts, caplog.text
    assert restarts or "round 1: " in caplog.text and "; making it again" in caplog.text
    assert_same_adapters(online_run / "step_6", out / "step_6")
    assert online.RoundFiles(out, 1).incomplete() is None
    assert (online.round_dir(out, 1) / "scores.jsonl").read_bytes() == \
        (online.round_dir(online_run, 1) / "scores.jsonl").read_bytes()  # the KL terms of the round-start policy


def test_damage_between_rounds_makes_the_files_again_from_the_round_start_policy(online_run, tiny_setup, tmp_path,
                                                                                caplog):  # fmt: skip
    """Resumed at a round's start (step_2: round 1 not trained on yet), a damaged file is made again from the policy,
    which is the round-start policy: what follows it too."""
    out = tmp_path / "between"
    shutil.copytree(online_run, out)
    for name in ("step_3", "step_4", "step_5", "step_6", "rounds/round_002"):
        shutil.rmtree(out / name)
    _edit_one_byte(online.round_dir(out, 1) / "scores.jsonl")
    run_online(online_cfg(tiny_setup, out, **SMALL, resume_from_checkpoint=True))
    assert "round 1: scores.jsonl does not match its hash in the manifest" in caplog.text
    assert_same_adapters(online_run / "step_6", out / "step_6")
    assert (online.round_dir(out, 1) / "scores.jsonl").read_bytes() == \
        (online.round_dir(online_run, 1) / "scores.jsonl").read_bytes()  # fmt: skip


def test_iterative_dpo_damaged_table_and_kill_9_resume_to_the_same_weights(tiny_setup, tmp_path, caplog):
    """``reference: previous_round``: round.json and the round's reference table deleted inside the round would have
    taken the reference from the mid-round policy; and a kill -9 inside round 1. Both end on the weights of the run
    never stopped."""
    settings = {**SMALL, "online.rounds": 2, "online.reference": "previous_round"}
    finished = tmp_path / "finished"
    run_online(online_cfg(tiny_setup, finished, **settings))
    out = tmp_path / "damaged"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "step_4")
    for name in ("round.json", "reference_logps.safetensors"):
        (online.round_dir(out, 1) / name).unlink()
    run_online(online_cfg(tiny_setup, out, **settings, resume_from_checkpoint=True))
    assert "round 1 restarts from" in caplog.text
    assert_same_adapters(finished / "step_4", out / "step_4")

    killed = tmp_path / "killed"
    cfg = online_cfg(tiny_setup, killed, **settings)
    _kill_when(_launch(cfg, tmp_path / "a.yaml"), lambda: (killed / "step_3/manifest.json").exists(), "first run")
    run_online(OmegaConf.merge(cfg, {"resume_from_checkpoint": True}))
    assert_same_adapters(finished / "step_4", killed / "step_4")
    assert (online.round_dir(killed, 1) / "reference_logps.safetensors").read_bytes() == \
        (online.round_dir(finished, 1) / "reference_logps.safetensors").read_bytes()  # fmt: skip


def test_a_full_disk_names_enospc_and_the_run_resumes_elsewhere(online_run, tiny_setup, tmp_path):
    """The output_dir on a 24 MiB tmpfs (in a user namespace): step_1 (17 MB) fits, step_2 does not. The run ends
    with one message naming ENOSPC, the checkpoint and the last good one, and leaves nothing half-written; its
    directory copied to a disk with room resumes to the weights of the run never stopped."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("this machine lets no user mount a tmpfs (unshare -rm)")
    full, copy = tmp_path / "full", tmp_path / "copy"
    full.mkdir()
    cfg = online_cfg(tiny_setup, full, **SMALL)
    OmegaConf.save(cfg, tmp_path / "run.yaml")
    shell = (f"mount -t tmpfs -o size=24m tmpfs {full} && {sys.executable} recipes/online_dpo_single_device.py "
             f"--config {tmp_path / 'run.yaml'}; status=$?; cp -a {full} {copy}; exit $status")  # fmt: skip
    done = subprocess.run(["unshare", "-rm", "sh", "-c", shell], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if "Error" in line and not line.startswith(" ")]
    assert done.returncode != 0 and len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith(f"dpo_components.checkpointing.CheckpointError: could not write checkpoint "
                                f"{full}/step_2 (WriteError: could not write the Hugging Face files of {full}/")
    assert "ENOSPC (No space left on device)" in errors[0] and f"the last good checkpoint is {full}/step_1" in errors[0]
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith((".", "step_"))) == ["step_1"]
    run_online(online_cfg(tiny_setup, copy, **SMALL, resume_from_checkpoint=True))
    assert_same_adapters(online_run / "step_6", copy / "step_6")
