"""Training-loop pieces every DPO recipe shares: the concatenated forward, metrics, data order, RNG, memory.

They are small on purpose; the recipes call them from a plain loop that stays readable top to bottom.
"""

from __future__ import annotations

import random
import resource
from typing import Any

import torch
from torch import Tensor, nn

from dpo_components.logprobs import sequence_logprobs
from dpo_components.losses import PreferenceLossOutput, SequenceLogProbs


def concatenated_logprobs(model: nn.Module, batch: dict[str, Tensor], chunk_size: int = 256) -> SequenceLogProbs:
    """One forward over the [2B, L] batch (chosen rows, then rejected) -> per-pair log-prob sums and counts."""
    logps, tokens = sequence_logprobs(model, batch["input_ids"], batch["labels"], chunk_size=chunk_size)
    return SequenceLogProbs.from_concatenated(logps, tokens)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch), so a resumed run can
    rebuild it and skip exactly the batches it has already trained on."""
    if not shuffle:
        return list(range(num_samples))
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


class PreferenceMetrics:
    """Accumulates per-pair DPO metrics over the micro-batches of a step (or an eval pass) and averages them.

    Names follow TRL and torchtune: loss, rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}.
    Accuracy counts a tie (margin exactly 0, e.g. before any training) as half right, not as wrong.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.pairs = 0
        self.tokens = 0

    def update(self, out: PreferenceLossOutput, policy: SequenceLogProbs, tokens: int = 0) -> None:
        margins = out.chosen_rewards - out.rejected_rewards
        accuracies = (margins > 0).float() + 0.5 * (margins == 0).float()
        values = {
            "loss": out.losses.detach(),
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/margins": margins,
            "rewards/accuracies": accuracies,
            "logps/chosen": policy.chosen_logps.detach(),
            "logps/rejected": policy.rejected_logps.detach(),
            **out.metrics,  # loss-specific, e.g. ipo/margin
        }
        stacked = torch.stack([v.float().sum() for v in values.values()]).tolist()  # one device sync
        for name, total in zip(values, stacked):
            self.sums[name] = self.sums.get(name, 0.0) + total
        self.pairs += out.losses.shape[0]
        self.tokens += tokens

    def compute(self) -> dict[str, float]:
        return {name: total / max(self.pairs, 1) for name, total in self.sums.items()}


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout, sampling), for an exact resume."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
