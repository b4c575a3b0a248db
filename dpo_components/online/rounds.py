"""Online and iterative DPO, the parts the recipe (``recipes/online_dpo_single_device.py``) shares with tests and
studies: the ``online`` settings, a round's prompts and samples, pairs from scored samples, and the round's files.

A round: take ``prompts_per_round`` prompts, sample ``samples_per_prompt`` (K) responses to each from the current
policy, score every response with the reward, pair them by the rule, then train ``steps_per_round`` optimizer
steps on the pairs. Online DPO (Guo et al. 2024) keeps the starting model as the reference; iterative DPO
(Xiong et al. 2024) makes each round's starting policy the reference of that round.

Pair rules (``pair_rule``), per prompt, over its K scored responses:

- ``best_vs_worst``: the highest-scored response against the lowest-scored one (the first of equal scores), one
  pair per prompt (Xiong et al.; TRL's online DPO with K = 2);
- ``all_pairs``: every two responses whose scores differ, up to K(K-1)/2 pairs per prompt.

A pair is dropped when its margin (chosen score - rejected score) is not above ``min_margin`` (0.0: only ties are
dropped) or when both responses are the same tokens.

The round's files, under ``<output_dir>/rounds/round_<r>/``, each written whole or not at all (temp name +
rename) and then recorded (size, BLAKE2b) in the round's ``manifest.json`` (:class:`RoundFiles`), in this order:

- ``samples.jsonl``: per prompt, its dataset index, messages, token ids and the K responses (ids, trained labels,
  text); written right after sampling, so scoring again never samples again;
- ``scores.jsonl``: per prompt, the K rewards and the responses' log-probs under the policy and the start model;
- ``pairs.jsonl``: the pairs as conversational preference rows (``prompt``, ``chosen``, ``rejected`` messages, plus
  scores and which samples): ``dpo_components.data.preference_dataset`` reads the file as it is;
- ``reference_logps.safetensors``: the round's reference log-probs of each pair (for losses with a reference);
- ``round.json``: the round's figures and its sampling seed, written last: the manifest then marks the round complete.

Sampling draws from a generator seeded by (seed, round) alone, so a round sampled again from the same weights
gives the same responses. A resumed run reads a round's files whenever they match the manifest; what does not match
is named and made again from the files before it, from the policy as the round starts. Training on a round starts
only once all of its files are written, so a checkpoint taken inside round r always finds them; if they were damaged
since, the round restarts from the checkpoint at its start (``round_maker.prepare_online_output_dir``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch import nn
from torchtune.data import Message
from torchtune.utils import get_logger
from tqdm import tqdm

from dpo_components.data import PreferenceDataset, stop_tokens
from dpo_components.data.dataset import labels_of, tokenize_responses
from dpo_components.data.formats import BadRow
from dpo_components.data.tools import check_tool_use, message_dicts, parse_tools
from dpo_components.files import (
    entries_problem,
    manifest_entries,
    read_manifest,
    save_tensors,
    write_json,
    write_jsonl,
)
from dpo_components.online.prompts import PromptDataset, prompt_messages
from dpo_components.samples import decode_response, generate_padded
from dpo_components.settings import ConfigError

log = get_logger("INFO")
PAIR_RULES = ("best_vs_worst", "all_pairs")
REFERENCES = ("start", "previous_round")


@dataclass(frozen=True)
class OnlineSettings:
    """The recipe's ``online`` section."""

    rounds: int
    prompts_per_round: int
    samples_per_prompt: int  # K >= 2
    steps_per_round: int  # optimizer steps per round (passes over the round's pairs as needed)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    pair_rule: str = "best_vs_worst"
    min_margin: float = 0.0
    reference: str = "start"  # start: online DPO; previous_round: iterative DPO
    generation_batch_size: int = 64  # sequences per generate call
    samples_file: str | None = None  # round 0 scores these responses instead of sampling (prompt, responses rows)

    @classmethod
    def from_config(cls, node: DictConfig | None) -> OnlineSettings:
        if node is None:
            raise ConfigError("the online recipe needs an 'online' section (rounds, prompts_per_round, "
                              "samples_per_prompt, steps_per_round)")  # fmt: skip
        values = OmegaConf.to_container(node, resolve=True)
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"online: unknown keys {unknown}; the keys are {sorted(cls.__dataclass_fields__)}")
        missing = [k for k in ("rounds", "prompts_per_round", "samples_per_prompt", "steps_per_round")
                   if values.get(k) is None]  # fmt: skip
        if missing:
            raise ConfigError(f"online: missing {missing}")
        settings = cls(**values)
        for key in ("rounds", "prompts_per_round", "steps_per_round", "max_new_tokens", "generation_batch_size"):
            value = getattr(settings, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"online.{key} must be a whole number >= 1, got {value!r}")
        if not isinstance(settings.samples_per_prompt, int) or settings.samples_per_prompt < 2:
            raise ConfigError(f"online.samples_per_prompt must be >= 2 (a pair needs two responses to one prompt), "
                              f"got {settings.samples_per_prompt!r}")  # fmt: skip
        if settings.pair_rule not in PAIR_RULES:
            raise ConfigError(f"online.pair_rule must be one of {PAIR_RULES}, got {settings.pair_rule!r}")
        if settings.reference not in REFERENCES:
            raise ConfigError(f"online.reference must be one of {REFERENCES} (start: online DPO; previous_round: "
                              f"iterative DPO), got {settings.reference!r}")  # fmt: skip
        if not settings.temperature > 0:
            raise ConfigError(f"online.temperature must be > 0, got {settings.temperature}")
        if not 0 < settings.top_p <= 1:
            raise ConfigError(f"online.top_p must be in (0, 1], got {settings.top_p}")
        if settings.top_k is not None and (isinstance(settings.top_k, bool) or not isinstance(settings.top_k, int)
                                           or settings.top_k < 1):  # fmt: skip
            raise ConfigError(f"online.top_k must be a whole number >= 1 or null (off), got {settings.top_k!r}")
        if settings.min_margin < 0:
            raise ConfigError(f"online.min_margin must be >= 0, got {settings.min_margin}")
        if settings.samples_file is not None and not Path(settings.samples_file).is_file():
            raise ConfigError(f"online.samples_file {settings.samples_file} does not exist")
        return settings


def round_prompt_indices(num_prompts: int, per_round: int, seed: int, round_index: int) -> list[int]:
    """The dataset indices of round ``round_index``'s prompts: consecutive slices of seeded passes over the prompts
    (each pass a new permutation), so every prompt comes up once before any comes up twice. Depends only on
    (seed, round)."""
    start = round_index * per_round
    passes: dict[int, list[int]] = {}
    for position in range(start, start + per_round):
        epoch = position // num_prompts
        if epoch not in passes:
            passes[epoch] = random.Random(f"{seed}-prompts-{epoch}").sample(range(num_prompts), num_prompts)
    return [passes[p // num_prompts][p % num_prompts] for p in range(start, start + per_round)]


def sampling_seed(seed: int, round_index: int) -> int:
    return (seed * 1_000_003 + 7919 * (round_index + 1)) % 2**63


@torch.no_grad()
def sample_round(
    model: nn.Module, prompts: Sequence[list[int]], tokenizer: Any, settings: OnlineSettings, seed: int
) -> list[list[dict[str, Any]]]:
    """K responses to each prompt (token ids), sampled from ``model`` in batches of ``generation_batch_size``
    sequences with a KV cache, from a generator seeded by ``seed``: per prompt a list of ``{"ids", "labels",
    "text"}`` (every sampled token is trained, the stop token included)."""
    k = settings.samples_per_prompt
    flat = [list(p) for p in prompts for _ in range(k)]
    rng = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    responses: list[list[int]] = []
    batches = range(0, len(flat), settings.generation_batch_size)
    for start in tqdm(batches, desc="sampling", dynamic_ncols=True, leave=False):
        responses += generate_padded(model, flat[start : start + settings.generation_batch_size],
                                     pad_id=tokenizer.pad_id, stop_tokens=stop_tokens(tokenizer),
                                     max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                     rng=rng, top_k=settings.top_k, top_p=settings.top_p)  # fmt: skip
    rows = [{"ids": ids, "labels": list(ids), "text": decode_response(tokenizer, ids)} for ids in responses]
    return [rows[i * k : (i + 1) * k] for i in range(len(prompts))]


def fixed_samples(path: str | Path, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """A ``samples_file``'s rows as a round's samples: each JSON line a prompt (``prompt``: string or messages, an
    optional ``system``) and ``responses`` (two or more strings), tokenized as the preference data tokenizes a
    response (the chat format's end of turn included, truncated to ``max_length`` tokens with the prompt). Errors
    name the file and line."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                prompt = prompt_messages({k: raw.get(k) for k in ("prompt", "system") if k in raw})
                tools = parse_tools(raw)
                check_tool_use(prompt, tools)
                texts = raw.get("responses")
                if not isinstance(texts, list) or len(texts) < 2 or not all(isinstance(t, str) for t in texts):
                    raise BadRow("'responses' must be a list of two or more strings")
                prompt_ids, tokenized, _ = tokenize_responses(
                    tokenizer, prompt, [[Message("assistant", t)] for t in texts], max_length, None, tools=tools
                )
            except (BadRow, json.JSONDecodeError) as error:
                raise ValueError(f"{path} line {number}: {error}") from None
            responses = [{"ids": ids, "labels": labels_of(ids, masked), "text": text}
                         for (ids, masked), text in zip(tokenized, texts)]  # fmt: skip
            rows.append({"prompt_index": len(rows), "prompt_ids": prompt_ids,
                         "messages": message_dicts(prompt), "responses": responses,
                         **({"tools": tools} if tools else {})})  # fmt: skip
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def build_pairs(
    rewards: Sequence[Sequence[float]], responses: Sequence[Sequence[dict[str, Any]]], rule: str, min_margin: float
) -> list[tuple[int, int, int]]:
    """(prompt, chosen sample, rejected sample) index triples by ``rule`` (module docstring), margins above
    ``min_margin`` only, never two identical responses nor an empty one (no token to score); in prompt order, then
    chosen, then rejected."""
    if rule not in PAIR_RULES:
        raise ValueError(f"pair rule must be one of {PAIR_RULES}, got {rule!r}")
    pairs = []
    for i, (scores, samples) in enumerate(zip(rewards, responses)):
        usable = [k for k in range(len(scores)) if samples[k]["ids"]]
        if not usable:
            continue
        if rule == "best_vs_worst":
            best = max(usable, key=lambda k: (scores[k], -k))  # the first of the highest
            worst = min(usable, key=lambda k: (scores[k], k))  # the first of the lowest
            candidates = [(best, worst)]
        else:
            candidates = [(a, b) for a in usable for b in usable if scores[a] > scores[b]]
        for chosen, rejected in candidates:
            if scores[chosen] - scores[rejected] > min_margin and samples[chosen]["ids"] != samples[rejected]["ids"]:
                pairs.append((i, chosen, rejected))
    return pairs


def pairs_dataset(
    samples: Sequence[dict[str, Any]], pairs: Sequence[tuple[int, int, int]], source: str
) -> PreferenceDataset:
    """The round's pairs as a :class:`PreferenceDataset` of token ids (what the recipe's collator batches)."""
    rows = []
    for i, chosen, rejected in pairs:
        sample = samples[i]
        a, b = sample["responses"][chosen], sample["responses"][rejected]
        rows.append({"prompt_ids": sample["prompt_ids"], "chosen_response_ids": a["ids"], "chosen_labels": a["labels"],
                     "rejected_response_ids": b["ids"], "rejected_labels": b["labels"]})  # fmt: skip
    return PreferenceDataset(rows, source, row_numbers=[i for i, _, _ in pairs])


def preference_rows(
    samples: Sequence[dict[str, Any]], rewards: Sequence[Sequence[float]], pairs: Sequence[tuple[int, int, int]]
) -> list[dict[str, Any]]:
    """The pairs as conversational preference rows (``pairs.jsonl``), with their scores and sample numbers."""
    rows = []
    for i, chosen, rejected in pairs:
        sample = samples[i]
        rows.append({"prompt": sample["messages"], **({"tools": sample["tools"]} if "tools" in sample else {}),
                     "chosen": [{"role": "assistant", "content": sample["responses"][chosen]["text"]}],
                     "rejected": [{"role": "assistant", "content": sample["responses"][rejected]["text"]}],
                     "chosen_reward": rewards[i][chosen], "rejected_reward": rewards[i][rejected],
                     "prompt_index": sample["prompt_index"], "chosen_sample": chosen,
                     "rejected_sample": rejected})  # fmt: skip
    return rows


def round_figures(
    rewards: Sequence[Sequence[float]],
    pairs: Sequence[tuple[int, int, int]],
    responses: Sequence[Sequence[dict[str, Any]]],
    policy_logps: Sequence[Sequence[float]] | None = None,
    start_logps: Sequence[Sequence[float]] | None = None,
) -> dict[str, float]:
    """What a round logs (``online/*``): the samples' reward mean / min / max / std, the pairs kept and their mean
    margin, the samples' mean length in tokens and, given their log-probs, the KL(policy || start) estimate: the mean
    of log pi - log start over the policy's own samples (unbiased for samples at temperature 1, unfiltered)."""
    flat = [r for scores in rewards for r in scores]
    mean = sum(flat) / len(flat)
    margins = [rewards[i][c] - rewards[i][r] for i, c, r in pairs]
    figures = {
        "online/reward_mean": mean, "online/reward_min": min(flat), "online/reward_max": max(flat),
        "online/reward_std": math.sqrt(sum((r - mean) ** 2 for r in flat) / len(flat)),
        "online/pairs": float(len(pairs)), "online/prompts_with_pair": float(len({i for i, _, _ in pairs})),
        "online/margin": sum(margins) / len(margins) if margins else 0.0,
        "online/response_tokens": sum(len(s["ids"]) for row in responses for s in row) / len(flat),
    }  # fmt: skip
    if policy_logps is not None and start_logps is not None:
        kl = [p - s for ps, ss in zip(policy_logps, start_logps) for p, s in zip(ps, ss)]
        figures["online/kl_to_start"] = sum(kl) / len(kl)
    return figures


# --------------------------------------------------------------------------------------------- round files


def round_dir(output_dir: str | Path, round_index: int) -> Path:
    return Path(output_dir) / "rounds" / f"round_{round_index:03d}"


ROUND_FILES = ("samples.jsonl", "scores.jsonl", "pairs.jsonl", "reference_logps.safetensors", "round.json")
ROUND_MANIFEST = "manifest.json"


class RoundFiles:
    """Round ``r``'s files (module docstring) under the round's ``manifest.json``: each written atomically, then
    recorded there (size, BLAKE2b); ``complete`` is set with ``round.json``, the last. A file is read back only
    when it matches its record (:meth:`kept`); one that does not is named in a warning and made again.

    The round's inputs, ``samples.jsonl`` and ``scores.jsonl``, come from the policy as the round starts; a new one
    makes every file after it stale (its record is dropped). The others follow from them (pairs, figures) or from the
    reference (the table)."""

    INPUTS = ("samples.jsonl", "scores.jsonl")

    def __init__(self, output_dir: str | Path, round_index: int) -> None:
        self.round = round_index
        self.directory = round_dir(output_dir, round_index)
        self.manifest = self.directory / ROUND_MANIFEST

    def _recorded(self) -> dict[str, Any]:
        try:
            return read_manifest(self.manifest)
        except FileNotFoundError:
            return {"files": {}}
        except ValueError as error:
            log.warning(f"round {self.round}: {self.manifest} is unreadable ({error}); its files are made again")
            return {"files": {}}

    def problem(self, name: str) -> str | None:
        """What is wrong with the round's file ``name`` against the manifest, or None when it can be read."""
        entry = self._recorded()["files"].get(name)
        if entry is None:
            after = " (written, but not recorded: killed between the two)" if (self.directory / name).exists() else ""
            return f"{name} is not in {self.manifest}{after}"
        return entries_problem(self.directory, {name: entry})

    def incomplete(self) -> str | None:
        """Why the round cannot be read back whole (the first bad file), or None when every file matches."""
        manifest = self._recorded()
        if not manifest.get("complete"):
            return f"{self.manifest} does not mark the round complete"
        return entries_problem(self.directory, manifest["files"])

    def trained_on(self) -> str:
        """A hash of the records of the files the policy trains on and cannot make again once it has: the inputs
        and the reference table. A checkpoint inside the round keeps it, so a resume sees files made again since."""
        recorded = self._recorded()["files"]
        names = [n for n in (*self.INPUTS, "reference_logps.safetensors") if n in recorded]
        return hashlib.blake2b("".join(f"{n}:{recorded[n]['blake2b']};" for n in names).encode(),
                               digest_size=16).hexdigest()  # fmt: skip

    def problem_inside(self, previous_round: bool, trained_on: str | None) -> str | None:
        """What keeps a resume inside the round from reading it back: an input that does not match, with
        ``previous_round`` the reference table (made from the policy as the round starts), or files made again
        since the checkpoint (``trained_on``: its :meth:`trained_on`, None for a checkpoint without one). The
        pairs, ``round.json`` and a table of the start model can be made again from what is kept."""
        recorded = self._recorded()["files"]
        table = ["reference_logps.safetensors"] if previous_round and "reference_logps.safetensors" in recorded else []
        for name in (*self.INPUTS, *table):
            if problem := self.problem(name):
                return problem
        if trained_on is not None and trained_on != self.trained_on():
            return "its files were made again after the checkpoint was saved"
        return None

    def kept(self, name: str) -> bool:
        """``name`` matches its record and can be read; a file that is there but does not match is named."""
        problem = self.problem(name)
        if problem and ((self.directory / name).exists() or name in self._recorded()["files"]):
            log.warning(f"round {self.round}: {problem}; making it again")
        return problem is None

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        return read_jsonl(self.directory / name)

    def read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(self.directory / name)

    def write(self, name: str, value: Any) -> None:
        """Write ``name`` (JSON lines for a list of rows, safetensors for tensors, else JSON), then record it; a new
        input drops the records of every file after it, and the round is complete once ``round.json`` is."""
        path = self.directory / name
        if name.endswith(".safetensors"):
            save_tensors(path, value)
        elif name.endswith(".jsonl"):
            write_jsonl(path, value)
        else:
            write_json(path, value)
        manifest = self._recorded()
        stale = ROUND_FILES[ROUND_FILES.index(name) + 1 :] if name in self.INPUTS else ()
        files = {k: v for k, v in manifest["files"].items() if k not in stale}
        files.update(manifest_entries(self.directory, [name]))
        complete = name == "round.json" or (name not in self.INPUTS and bool(manifest.get("complete")))
        write_json(self.manifest, {"files": files, "complete": complete})


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def round_samples_of(prompts: PromptDataset, indices: Sequence[int]) -> list[dict[str, Any]]:
    """The prompts of a round as the start of ``samples.jsonl`` rows (responses still to come)."""
    return [{"prompt_index": i, "prompt_ids": prompts[i]["prompt_ids"], "messages": prompts[i]["messages"],
             **({"tools": prompts[i]["tools"]} if "tools" in prompts[i] else {})}
            for i in indices]  # fmt: skip
