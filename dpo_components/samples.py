"""Samples at eval time: responses of the policy and the reference to held-out prompts, their true reward when
the task has one, and a sequence-level KL estimate of the policy from the reference.

As the original DPO code does at every eval, the recipes sample from both models and log the text, so a run is
judged by reading it, not only by its numbers. Config keys (all recipes):

    eval_samples: 8             # prompts, the first N distinct ones of the eval dataset (0 or absent: off)
    max_new_tokens: 40
    temperature: 1.0            # the KL estimate assumes 1.0 (samples from the policy itself)
    eval_reward_fn: dpo_components.tiny.synthetic.sentiment_reward   # optional: text -> float, the task's true reward

Logged as ``eval/samples/reward`` (policy), ``eval/samples/reference_reward`` and ``eval/samples/kl``; the text
goes to ``samples.jsonl`` beside a DiskLogger's log, a TensorBoard text summary, or a W&B table.

Under FSDP every rank generates a share of the prompts with its sharded model (a forward needs all ranks), all
for the same number of steps (no early stop: a rank that stopped would leave the others in a collective), and
rank 0 gathers the text; a gathered full copy of a large model would not fit where the sharded one does.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torchtune.config._utils import _get_component_from_path
from torchtune.generation import generate, generate_next_token
from torchtune.modules import local_kv_cache
from torchtune.training.metric_logging import DiskLogger, TensorBoardLogger, WandBLogger

from dpo_components.data import IGNORE_INDEX, decode_text, stop_tokens
from dpo_components.files import writing
from dpo_components.logprobs import sequence_logprobs
from dpo_components.precision import compute_dtype
from dpo_components.settings import ConfigError
from dpo_components.vision.data import VisionPreferenceDataset

log = logging.getLogger(__name__)

ReferenceContext = Callable[[], contextlib.AbstractContextManager[nn.Module]]


@dataclass
class SampleSettings:
    """What ``eval_samples`` and its sibling keys ask for."""

    prompts: int
    max_new_tokens: int = 40
    temperature: float = 1.0
    reward_fn: Callable[[str], float] | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> SampleSettings | None:
        n = cfg.get("eval_samples") or 0
        if n < 0:
            raise ValueError(f"eval_samples must be >= 0, got {n}")
        if n == 0:
            return None
        reward_path = cfg.get("eval_reward_fn")
        reward_fn = _get_component_from_path(reward_path) if reward_path else None
        temperature = float(cfg.get("temperature", 1.0))
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return cls(n, int(cfg.get("max_new_tokens", 40)), temperature, reward_fn)


@dataclass
class EvalSampling:
    """``eval_samples``: what to sample at every eval (the settings, the held-out prompts, the tokenizer, the
    seed)."""

    settings: SampleSettings
    prompts: list[list[int]]
    tokenizer: Any
    seed: int


def eval_sampling(cfg: Any, eval_data: Any, tokenizer: Any, seed: int) -> EvalSampling | None:
    """A recipe's eval sampling, or None: ``eval_samples`` 0, or (with a warning) no eval dataset."""
    settings = SampleSettings.from_config(cfg)
    if settings is None:
        return None
    if eval_data is None:
        log.warning("eval_samples is set but there is no eval_dataset: no samples are drawn")
        return None
    if isinstance(eval_data, VisionPreferenceDataset):  # generation does not take images yet
        raise ConfigError("eval_samples does not sample with images yet: set eval_samples=0 for image-grounded pairs")
    return EvalSampling(settings, eval_prompts(eval_data, settings.prompts), tokenizer, seed)


def eval_prompts(dataset: Any, n: int) -> list[list[int]]:
    """The first ``n`` distinct prompts (token ids, chat format with the generation prompt) of a dataset."""
    prompts: dict[tuple[int, ...], None] = {}
    for i in range(len(dataset)):
        prompts.setdefault(tuple(dataset[i]["prompt_ids"]), None)
        if len(prompts) == n:
            break
    return [list(p) for p in prompts]


@torch.no_grad()
def generate_padded(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    pad_id: int,
    stop_tokens: list[int] | None,
    max_new_tokens: int,
    temperature: float,
    rng: torch.Generator,
    stop_early: bool = True,
    top_k: int | None = None,
    top_p: float = 1.0,
) -> list[list[int]]:
    """Sample a response to each prompt in one left-padded batch with torchtune's ``generate`` (KV-cached).

    Each response keeps its first stop token (its probability is part of the sequence) and nothing after it, nor
    anything from a pad token on (``generate`` pads rows that stopped).
    ``stop_early=False`` runs all ``max_new_tokens`` steps even when every row has stopped (needed under FSDP).
    ``top_k`` (torchtune's) and ``top_p`` (nucleus sampling: the smallest set of tokens whose probability at
    ``temperature`` reaches ``top_p``, :class:`NucleusLogits`) narrow what is sampled; 1.0 / None: off.
    """
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    batch = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    was_training = model.training
    model.eval()
    with local_kv_cache(model, batch_size=len(prompts), device=device, dtype=compute_dtype(model),
                        decoder_max_seq_len=width + max_new_tokens):  # fmt: skip
        sampled = NucleusLogits(model, top_p, temperature) if top_p < 1.0 else model
        output, _ = generate(sampled, batch, max_generated_tokens=max_new_tokens, pad_id=pad_id,
                             temperature=temperature, top_k=top_k, stop_tokens=stop_tokens if stop_early else None,
                             rng=rng, custom_generate_next_token=_next_token_keeping_no_logits)  # fmt: skip
    model.train(was_training)
    stops = set(stop_tokens or [])
    responses = []
    for row in output[:, width:].tolist():  # a row ends at its first stop token (kept) or pad (generate's filler)
        end = next((k + (t in stops) for k, t in enumerate(row) if t in stops or t == pad_id), len(row))
        responses.append(row[:end])
    return responses


def _next_token_keeping_no_logits(model: nn.Module, input_pos: torch.Tensor, x: torch.Tensor,
                                  q: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """torchtune's ``generate_next_token`` (the same token, the same draw), returning no logits: ``generate`` keeps
    every step's fp32 [B, 1, V] logits otherwise (64 rows x 512 steps of a 152k vocabulary: 20 GB)."""
    tokens, logits = generate_next_token(model, input_pos=input_pos, x=x, q=q, **kwargs)
    return tokens, logits[:, :0]


class NucleusLogits(nn.Module):
    """The model's logits of its last position (all ``generate`` reads), those outside the top-p nucleus set to -inf
    (torchtune's ``generate`` has top-k but no top-p). The nucleus is the smallest set of most likely tokens whose
    probability at ``temperature`` sums to at least ``top_p``; the most likely token is always kept. With top-k as
    well, the smaller of the two sets is sampled (Hugging Face applies top-p to the top-k tokens renormalised)."""

    def __init__(self, model: nn.Module, top_p: float, temperature: float) -> None:
        super().__init__()
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.model, self.top_p, self.temperature = model, top_p, temperature

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        last = self.model(*args, **kwargs)[:, -1:]
        probs, order = torch.softmax(last.float() / max(self.temperature, 1e-5), dim=-1).sort(dim=-1, descending=True)
        outside = probs.cumsum(dim=-1) - probs >= self.top_p  # the mass before a token already reaches top_p
        return last.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))

    def __getattr__(self, name: str) -> Any:  # caches_are_enabled, tok_embeddings, ... of the wrapped model
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


@torch.no_grad()
def response_logprobs(model: nn.Module, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
    """log p(response | prompt) summed over the response tokens, per row (0 for an empty response)."""
    device = next(model.parameters()).device
    inputs = [torch.tensor(p + r) for p, r in zip(prompts, responses)]
    labels = [torch.tensor([IGNORE_INDEX] * len(p) + r) for p, r in zip(prompts, responses)]
    input_ids = pad_sequence(inputs, batch_first=True, padding_value=0).to(device)
    label_ids = pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX).to(device)
    logps, _ = sequence_logprobs(model, input_ids, label_ids)
    return logps.float().cpu()


def sample_and_score(
    policy: nn.Module,
    reference: ReferenceContext | None,
    prompts: list[list[int]],
    tokenizer: Any,
    settings: SampleSettings,
    seed: int,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Sample from the policy (and the reference), score, and return (metrics, rows of text) on rank 0.

    The KL estimate is the Monte-Carlo estimate of the sequence-level KL divergence over the sampled prompts,

        KL(pi || ref) = E_x E_{y ~ pi(.|x)} [log pi(y|x) - log ref(y|x)]  ~  mean_i [log pi(y_i|x_i) - log ref(y_i|x_i)]

    with y_i sampled from the policy: unbiased at temperature 1 (responses cut at ``max_new_tokens`` are scored
    as the prefixes they are). ``reference`` opens a context that yields the reference model
    (``Reference.sampling_context``: the frozen copy, or the policy with its adapters off); None (a precomputed
    reference of a full fine-tune keeps no model) skips the reference and the KL.
    Under torch.distributed each rank takes every world-th prompt; sums are all-reduced and text gathered.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = prompts[rank::world]
    share = -(-len(prompts) // world)
    padded = mine + [prompts[0]] * (share - len(mine))  # same batch on every rank: the forwards stay in step
    rng = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed * 1_000_003 + rank)
    generate_kwargs = dict(pad_id=tokenizer.pad_id, stop_tokens=stop_tokens(tokenizer), rng=rng,
                           max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                           stop_early=world == 1)  # fmt: skip
    policy_ids = generate_padded(policy, padded, **generate_kwargs)
    totals = {"reward": 0.0, "reference_reward": 0.0, "kl": 0.0}
    reference_ids = [[] for _ in padded]
    if reference is not None:
        policy_logps = response_logprobs(policy, padded, policy_ids)
        with reference() as reference_model:
            reference_ids = generate_padded(reference_model, padded, **generate_kwargs)
            reference_logps = response_logprobs(reference_model, padded, policy_ids)
        totals["kl"] = float((policy_logps - reference_logps)[: len(mine)].sum())
    rows = []
    for prompt, ours, theirs in list(zip(padded, policy_ids, reference_ids))[: len(mine)]:
        row = {"prompt": decode_response(tokenizer, prompt), "policy": decode_response(tokenizer, ours)}
        if reference is not None:
            row["reference"] = decode_response(tokenizer, theirs)
        if settings.reward_fn is not None:
            totals["reward"] += settings.reward_fn(row["policy"])
            if reference is not None:
                totals["reference_reward"] += settings.reward_fn(row["reference"])
        rows.append(row)
    if world > 1:
        summed = torch.tensor(list(totals.values()), dtype=torch.float64, device=_collective_device())
        dist.all_reduce(summed)
        totals = dict(zip(totals, summed.tolist()))
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [gathered[i % world][i // world] for i in range(len(prompts))]  # back to the prompts' order
    metrics = {}
    if settings.reward_fn is not None:
        metrics["eval/samples/reward"] = totals["reward"] / len(prompts)
    if reference is not None:
        metrics["eval/samples/kl"] = totals["kl"] / len(prompts)
        if settings.reward_fn is not None:
            metrics["eval/samples/reference_reward"] = totals["reference_reward"] / len(prompts)
    return metrics, rows


def decode_response(tokenizer: Any, ids: list[int]) -> str:
    """Sampled ids as text, without stop tokens. An id the tokenizer has no token for (models pad their embedding
    past the tokenizer's vocabulary, as Qwen's do, and may sample those rows) becomes U+FFFD instead of an error."""
    stops = set(stop_tokens(tokenizer))
    ids = [t for t in ids if t not in stops]
    try:
        return decode_text(tokenizer, ids).strip()
    except (KeyError, IndexError, ValueError, TypeError):  # TypeError: Qwen2 joins None for an unknown id
        pass
    text, run = [], []  # decode the runs of known ids between the unknown ones
    for t in ids + [None]:
        known = t is not None and _decodes(tokenizer, t)
        if known:
            run.append(t)
            continue
        text.append(decode_text(tokenizer, run) if run else "")
        run = []
        if t is not None:
            text.append("\ufffd")
    return "".join(text).strip()


def _decodes(tokenizer: Any, token: int) -> bool:
    try:
        decode_text(tokenizer, [token])
    except (KeyError, IndexError, ValueError, TypeError):  # TypeError: Qwen2 joins None for an unknown id
        return False
    return True


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def log_samples(metric_logger: Any, rows: list[dict[str, str]], step: int) -> None:
    """Write the sampled text where the metric logger writes: ``samples.jsonl`` beside a DiskLogger's log file (one
    JSON line per sample, with the step), a TensorBoard text summary, a W&B table; else print it."""
    if not rows:
        return
    columns = list(rows[0])
    metric_logger = getattr(metric_logger, "logger", metric_logger)  # the recipes' LoggedWrites wraps it
    if isinstance(metric_logger, DiskLogger):
        with writing(metric_logger.log_dir / "samples.jsonl", "eval samples"), \
                open(metric_logger.log_dir / "samples.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
    elif isinstance(metric_logger, TensorBoardLogger):
        if metric_logger._writer is not None:
            escape = lambda text: text.replace("|", "\\|").replace("\n", " ")
            table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            table += ["| " + " | ".join(escape(row[c]) for c in columns) + " |" for row in rows]
            metric_logger._writer.add_text("eval/samples", "\n".join(table), global_step=step)
    elif isinstance(metric_logger, WandBLogger):
        if metric_logger._wandb.run is not None:
            table = metric_logger._wandb.Table(columns=["step", *columns],
                                               data=[[step, *(row[c] for c in columns)] for row in rows])  # fmt: skip
            metric_logger._wandb.log({"eval/samples": table, "global_step": step})
    else:
        for row in rows:
            print(f"step {step} sample: " + " | ".join(f"{c}: {row[c]}" for c in columns))
