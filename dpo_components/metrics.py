"""What a step logs: per-pair DPO metrics averaged over the micro-batches of a step, and peak memory."""

from __future__ import annotations

import resource

import torch
from torch import Tensor

from dpo_components.data.collate import batch_positions
from dpo_components.losses import PreferenceLossOutput, SequenceLogProbs


class PreferenceMetrics:
    """Accumulates per-pair DPO metrics over the micro-batches of a step (or an eval pass) and averages them.

    Names follow TRL and torchtune: loss, rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}.
    Accuracy counts a tie (margin exactly 0, e.g. before any training) as half right, not as wrong.
    Given the batches, it also counts ``tokens`` (prompt + response of both sides, without padding: the same
    count in the standard and the prefix-shared layout) and logs ``padding_fraction``, the share of computed
    positions that were padding.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.pairs = 0
        self.tokens = 0
        self.data_positions = self.computed_positions = 0

    def update(
        self, out: PreferenceLossOutput, policy: SequenceLogProbs, batch: dict[str, Tensor] | None = None
    ) -> None:
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
        if batch is not None:
            self.tokens += int(batch["lengths"].sum())
            data, computed = batch_positions(batch)
            self.data_positions += data
            self.computed_positions += computed

    def compute(self) -> dict[str, float]:
        results = {name: total / max(self.pairs, 1) for name, total in self.sums.items()}
        if self.computed_positions:
            results["padding_fraction"] = 1 - self.data_positions / self.computed_positions
        return results


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
