"""A round of online / iterative DPO as one component: :class:`RoundMaker` makes each round's pairs and their
reference from the policy (prompts, sampling, scoring, pairing, the round's files, the round's reference table), or
reads a finished round back, and cuts the pairs into the round's optimizer steps. The recipe trains those steps
as the offline recipes train theirs (the same micro-batches, ``max_micro_batch_tokens`` too).

Also here: the prompts' length check, the rounds' part of the output directory (``rounds/run.json``, the
fingerprint of the run the rounds belong to; a run killed in round 0, before its first checkpoint, resumes from the
round's files) and the ``online`` and ``reward_fn`` keys of the run's fingerprint.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune.modules.peft import disable_adapter
from torchtune.utils import get_logger

import dpo_components.online.rounds as rounds
from dpo_components.checkpointing import (
    CheckpointError,
    check_same_run,
    checkpoint_problem,
    load_recipe_state,
    prepare_output_dir,
    step_dirs,
)
from dpo_components.data import PreferenceDataset
from dpo_components.data.collate import make_collator
from dpo_components.data.micro_batches import check_pairs_fit_budget
from dpo_components.data.order import batch_order
from dpo_components.files import remove_stale_temporaries, write_json
from dpo_components.losses import PreferenceLoss
from dpo_components.online.prompts import PromptDataset
from dpo_components.online.rewards import Reward, score
from dpo_components.reference import Reference, compute_reference_logprobs
from dpo_components.samples import response_logprobs
from dpo_components.settings import ConfigError, RecipeSettings

log = get_logger("INFO")
RUN_FILE = "run.json"  # rounds/run.json: the fingerprint of the run the rounds belong to


def prepare_online_output_dir(settings: RecipeSettings, online: rounds.OnlineSettings) -> tuple[Path | None, bool]:
    """:func:`~dpo_components.checkpointing.prepare_output_dir` with the rounds: returns (the checkpoint to resume
    or None, whether the run resumes in round 0 from its files alone: killed before its first checkpoint). A fresh
    run refuses the rounds of an earlier run unless ``overwrite_output_dir``, which deletes them.

    A checkpoint inside round r holds a policy that has trained on the round's inputs (samples, scores; with
    ``previous_round`` the reference table), which only the policy at the round's start can make: if they no longer
    match their manifest, or were made again after the checkpoint (its ``round_files``), the run resumes from the
    checkpoint at the round's start instead (the newest one between rounds; none: from the start of the run), with
    a warning naming the bad file. The checkpoints after that one stay until the run writes them again."""
    s, directory = settings, settings.output_dir / "rounds"
    resume_round_0 = s.resume and not step_dirs(s.output_dir) and (directory / RUN_FILE).exists()
    resume_dir = prepare_output_dir(s.output_dir, s.resume and not resume_round_0, s.overwrite_output_dir)
    if resume_dir is None and not resume_round_0 and directory.exists():
        if not s.overwrite_output_dir:
            raise ConfigError(f"output_dir {s.output_dir} holds the rounds of an earlier run ({directory}). Set "
                              "resume_from_checkpoint=true to continue it, overwrite_output_dir=true to delete "
                              "them and start over, or choose another output_dir.")  # fmt: skip
        shutil.rmtree(directory)
    if directory.is_dir():  # what a kill while a round file was written left (never read: not in the manifest)
        remove_stale_temporaries(directory, "round_*/.*.tmp-*")
    if resume_dir is not None:
        state = load_recipe_state(resume_dir)
        r = state["epochs_run"]
        if state["batches_done_in_epoch"] > 0 and (problem := rounds.RoundFiles(s.output_dir, r).problem_inside(
                online.reference == "previous_round", state.get("round_files"))):  # fmt: skip
            inside, resume_dir = resume_dir, _round_start_checkpoint(s.output_dir, resume_dir)
            log.warning(f"round {r}: {problem}; {inside.name} has trained on the round's files, which only the policy "
                        f"at the round's start can make again: round {r} restarts from "
                        f"{resume_dir or 'the start of the run'} (the checkpoints after it stay until the run "
                        "writes them again)")  # fmt: skip
            resume_round_0 = resume_dir is None
    return resume_dir, resume_round_0


def _step(checkpoint_dir: Path) -> int:
    return int(checkpoint_dir.name.removeprefix("step_"))


def _round_start_checkpoint(output_dir: Path, inside: Path) -> Path | None:
    """The newest complete checkpoint before ``inside`` taken between rounds (none inside a round), or None."""
    for path in step_dirs(output_dir):
        if _step(path) >= _step(inside):
            continue
        try:
            between_rounds = load_recipe_state(path)["batches_done_in_epoch"] == 0  # read before any hashing
        except (CheckpointError, KeyError):
            continue
        if between_rounds and checkpoint_problem(path) is None:
            return path
    return None


def claim_rounds(output_dir: Path, fingerprint: dict[str, Any], resume_round_0: bool) -> None:
    """Write the run's fingerprint beside the rounds, or (resuming in round 0) check it against theirs."""
    path = output_dir / "rounds" / RUN_FILE
    if resume_round_0:
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot read {path} ({error}), the fingerprint of the run these rounds belong to: "
                                  "start over with overwrite_output_dir=true") from None  # fmt: skip
        check_same_run(path.parent, saved, fingerprint)
        log.info(f"resuming at step 0: no checkpoint yet, reading round 0's files in {path.parent}")
    else:
        write_json(path, fingerprint)


def online_fingerprint_keys(cfg: DictConfig) -> dict[str, Any]:
    """The ``online`` and ``reward_fn`` keys for the run's fingerprint: a resume must sample, score and pair alike
    (a reward model's batch size left out: lowered after an out-of-memory, then resumed)."""
    values = {f"online.{k}": v for k, v in OmegaConf.to_container(cfg.online, resolve=True).items()}
    reward = OmegaConf.to_container(cfg.reward_fn, resolve=True)
    reward.pop("batch_size", None)
    values["reward_fn"] = json.dumps(reward, sort_keys=True)
    return values


def check_prompts_fit(prompts: PromptDataset, online: rounds.OnlineSettings, settings: RecipeSettings,
                      max_seq_len: int) -> None:  # fmt: skip
    """Every prompt plus ``max_new_tokens`` (twice with prefix sharing) fits the model, named at setup."""
    responses, multiple = 2 if settings.prefix_sharing else 1, settings.pad_to_multiple_of
    for i in range(len(prompts)):
        need = len(prompts[i]["prompt_ids"]) + responses * online.max_new_tokens
        need += -need % multiple  # padded
        if need > max_seq_len:
            raise ConfigError(
                f"prompt_dataset: prompt {i} ({prompts.source} row {prompts.row_numbers[i]}) with "
                f"online.max_new_tokens needs {need} tokens, more than the model's max_seq_len {max_seq_len}; "
                "set prompt_dataset.max_prompt_length or lower max_new_tokens"
            )


class RoundMaker:
    """Each round's pairs and reference, from the current ``policy`` (a LoRA model: adapters off are the start).

    ``start``: the starting model as a :class:`Reference` (adapters off; "none" for a reference-free loss), the
    reference of ``online.reference: start`` and of eval; ``previous_round`` takes a frozen view of the policy as
    the round begins instead. ``collate``: the recipe's collator (its layout decides what fits)."""

    def __init__(self, online: rounds.OnlineSettings, settings: RecipeSettings, *, policy: nn.Module, tokenizer: Any,
                 prompts: PromptDataset, reward: Reward, collate: Any, loss: PreferenceLoss, start: Reference,
                 seed: int, metric_logger: Any) -> None:  # fmt: skip
        self.online, self.settings = online, settings
        self.policy, self.tokenizer, self.prompts, self.reward = policy, tokenizer, prompts, reward
        self.collate, self.loss, self.start, self.seed = collate, loss, start, seed
        self.metric_logger = metric_logger
        self.trained_on: str | None = None  # the current round's RoundFiles.trained_on, for its checkpoints

    def round(self, r: int, step: int, mid_round: bool = False) -> tuple[PreferenceDataset, Reference]:
        """Round ``r``'s pairs and their reference, its figures logged at optimizer step ``step``.

        Each of the round's files that matches the manifest is read back (a resume); what does not is made again.
        The inputs, samples and scores (rewards and the KL terms), come from the policy as the round starts: a new
        one makes every file after it again. Pairs and ``round.json`` follow from the inputs, the reference table from
        the start model or (``previous_round``) the policy. ``mid_round``: the policy has trained on the round
        already, so nothing may be made from it again: the inputs (and a ``previous_round`` table) must match, as
        ``prepare_online_output_dir`` made sure by restarting the round otherwise."""
        o, where = self.online, f"round {r}"
        files = rounds.RoundFiles(self.settings.output_dir, r)
        if mid_round and (problem := files.problem_inside(o.reference == "previous_round", None)):
            raise CheckpointError(f"{where}: resuming inside the round, but {problem}; resume again (the round "
                                  "restarts from the checkpoint at its start)")  # fmt: skip
        started = time.perf_counter()
        new_inputs = not files.kept("samples.jsonl")  # a new input: every file after it is made again
        samples = self._sample(r, files) if new_inputs else files.read_jsonl("samples.jsonl")
        sampled_at = time.perf_counter()
        # the KL estimate needs samples of the policy itself: temperature 1, no top-p / top-k, not a samples_file
        own_samples = o.temperature == 1.0 and o.top_p == 1.0 and o.top_k is None and not (r == 0 and o.samples_file)
        if not new_inputs and files.kept("scores.jsonl"):
            rows = files.read_jsonl("scores.jsonl")
        else:
            rows, new_inputs = self._score(samples, own_samples, where), True
            files.write("scores.jsonl", rows)
        rewards = [row["rewards"] for row in rows]
        pairs = rounds.build_pairs(rewards, [row["responses"] for row in samples], o.pair_rule, o.min_margin)
        if new_inputs or not files.kept("pairs.jsonl"):
            files.write("pairs.jsonl", rounds.preference_rows(samples, rewards, pairs))
        dataset = rounds.pairs_dataset(samples, pairs, where)
        self._check_pairs_fit(dataset, where)  # a resumed run's layout and budget may differ
        table = None
        if self._needs_table(pairs):  # the reference's log-probs of the round's pairs, once
            if not new_inputs and files.kept("reference_logps.safetensors"):
                table = files.read_tensors("reference_logps.safetensors")
            else:
                table = self._reference_table(dataset)
                files.write("reference_logps.safetensors", table)
        self.trained_on = files.trained_on()  # kept by the checkpoints inside this round
        if not new_inputs and files.kept("round.json"):
            log.info(f"{where}: read {len(pairs)} pairs from {files.directory}")
            return dataset, self._round_reference(table)

        figures = rounds.round_figures(rewards, pairs, [row["responses"] for row in samples],
                                       [row["policy_logps"] for row in rows] if own_samples else None,
                                       [row["start_logps"] for row in rows] if own_samples else None)  # fmt: skip
        figures.update({"online/round": float(r), "online/sampling_seconds": sampled_at - started,
                        "online/scoring_seconds": time.perf_counter() - sampled_at})  # fmt: skip
        summary = {"round": r, "sampling_seed": rounds.sampling_seed(self.seed, r), "prompts": len(samples),
                   "samples_file": o.samples_file if r == 0 else None, "reward": repr(self.reward),
                   "reference": o.reference, "figures": figures}  # fmt: skip
        files.write("round.json", summary)  # last: the round is complete
        if mid_round:  # its figures were logged when the round began
            return dataset, self._round_reference(table)
        self.metric_logger.log_dict(figures, step=step)
        kl = f", KL to start {figures['online/kl_to_start']:.3f}" if own_samples else ""
        log.info(f"{where}: {len(samples)} prompts, reward mean {figures['online/reward_mean']:.3f} "
                 f"(min {figures['online/reward_min']:.3f}, max {figures['online/reward_max']:.3f}), {len(pairs)} "
                 f"pairs{kl}")  # fmt: skip
        return dataset, self._round_reference(table)

    def _sample(self, r: int, files: rounds.RoundFiles) -> list[dict[str, Any]]:
        """Round ``r``'s prompts with their responses, sampled from the policy (round 0: or read from
        ``samples_file``), written to ``samples.jsonl`` at once (a kill while scoring does not sample again)."""
        o = self.online
        if r == 0 and o.samples_file:
            samples = rounds.fixed_samples(o.samples_file, self.tokenizer, self.policy.max_seq_len)
        else:
            indices = rounds.round_prompt_indices(len(self.prompts), o.prompts_per_round, self.seed, r)
            samples = rounds.round_samples_of(self.prompts, indices)
            responses = rounds.sample_round(self.policy, [row["prompt_ids"] for row in samples], self.tokenizer, o,
                                            rounds.sampling_seed(self.seed, r))  # fmt: skip
            for row, sampled in zip(samples, responses):
                row["responses"] = sampled
        files.write("samples.jsonl", samples)
        return samples

    def _score(self, samples: list[dict[str, Any]], own_samples: bool, where: str) -> list[dict[str, Any]]:
        """``scores.jsonl``'s rows: per prompt the rewards of its responses and, for the policy's own samples, their
        log-probs under the policy and the start model (the KL terms)."""
        flat = [(row["messages"], row["prompt_ids"], resp) for row in samples for resp in row["responses"]]
        scores = score(self.reward, [m for m, _, _ in flat], [resp["text"] for _, _, resp in flat], where)
        policy_logps, start_logps = (self._kl_terms([p for _, p, _ in flat], [resp["ids"] for _, _, resp in flat])
                                     if own_samples else ([None] * len(flat), [None] * len(flat)))  # fmt: skip
        rows, at = [], 0
        for row in samples:
            k = len(row["responses"])
            rows.append({"prompt_index": row["prompt_index"], "rewards": scores[at : at + k],
                         "policy_logps": policy_logps[at : at + k], "start_logps": start_logps[at : at + k]})
            at += k
        return rows

    def _reference_table(self, dataset: PreferenceDataset) -> dict[str, torch.Tensor]:
        """The round's reference log-probs of its pairs: the start model, or (``previous_round``) the policy now."""
        s = self.settings
        live = self.start if self.online.reference == "start" else Reference(
            "frozen_copy", s.device, model=self.policy, chunk_size=s.logprob_chunk_size,
            flex_attention=s.flex_attention)  # fmt: skip
        return compute_reference_logprobs(live, dataset, self.collate, s.reference.batch_size)

    def steps(self, pairs: PreferenceDataset, r: int) -> list[list[int]]:
        """The optimizer steps of round ``r``, each a list of ``batch_size x gradient_accumulation_steps`` pair
        indices: passes over the pairs, each in its own seeded order (pass p of round r is epoch p * rounds + r of
        ``batch_order``), cut into whole batches. Empty when the round has fewer pairs than ``batch_size``."""
        s = self.settings
        accumulation, need = s.gradient_accumulation_steps, self.online.steps_per_round * s.gradient_accumulation_steps
        if len(pairs) < s.batch_size:
            return []
        batches: list[list[int]] = []
        for p in range(math.ceil(need / (len(pairs) // s.batch_size))):
            order = batch_order(pairs, self.seed, p * self.online.rounds + r, s.batch_size, s.shuffle,
                                s.group_by_length, s.prefix_sharing)  # fmt: skip
            batches += [order[i : i + s.batch_size] for i in range(0, len(order) - s.batch_size + 1, s.batch_size)]
        batches = batches[:need]
        return [sum(batches[i : i + accumulation], []) for i in range(0, need, accumulation)]

    def _check_pairs_fit(self, pairs: PreferenceDataset, where: str) -> None:
        """Every pair of the round fits the model in the batch layout (padding, prefix sharing, packing) and, with
        ``max_micro_batch_tokens``, the budget: named otherwise."""
        s = self.settings
        collate = make_collator(self.tokenizer.pad_id, self.policy.max_seq_len, s.pad_to_multiple_of,
                                s.prefix_sharing, datasets={f"{where} pairs": pairs}, packing=s.packing,
                                packing_row_tokens=s.packing_row_tokens)  # fmt: skip
        if s.max_micro_batch_tokens is not None:
            check_pairs_fit_budget(s.max_micro_batch_tokens, collate, **{f"{where} pairs": pairs})

    def _needs_table(self, pairs: list) -> bool:
        return self.loss.needs_reference and len(pairs) >= self.settings.batch_size

    def _round_reference(self, cache: dict[str, torch.Tensor] | None) -> Reference:
        if cache is None:
            return Reference("none", self.settings.device)
        return Reference("precomputed", self.settings.device, cache={"train": cache})

    @torch.no_grad()
    def _kl_terms(self, prompts: list[list[int]], responses: list[list[int]]) -> tuple[list[float], list[float]]:
        """log pi(y|x) and log start(y|x) of each sample (their difference averages to the KL to the start)."""
        was_training, step = self.policy.training, self.online.generation_batch_size
        self.policy.eval()
        policy, start = [], []
        for i in range(0, len(prompts), step):
            batch = (prompts[i : i + step], responses[i : i + step])
            policy += response_logprobs(self.policy, *batch).tolist()
            with disable_adapter(self.policy):
                start += response_logprobs(self.policy, *batch).tolist()
        self.policy.train(was_training)
        return policy, start
