"""What a step logs: per-pair DPO metrics averaged over the micro-batches of a step, and peak memory; the
warning when the gradient stays exactly 0."""

from __future__ import annotations

import resource

import torch
import torch.distributed as dist
from torch import Tensor
from torchtune.utils import get_logger

from dpo_components.data.collate import batch_positions
from dpo_components.losses import PreferenceLossOutput, SequenceLogProbs

log = get_logger("INFO")
TOTALS = ("count/desirable", "count/undesirable")  # logged as totals over the interval, not averaged


class PreferenceMetrics:
    """Accumulates per-pair DPO metrics over the micro-batches of a step (or an eval pass) and averages them.

    Names follow TRL and torchtune: loss, rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}.
    Accuracy counts a tie (margin exactly 0, e.g. before any training) as half right, not as wrong.
    Given the batches, it also counts ``tokens`` (prompt + response of both sides, without padding: the same
    count in the standard and the prefix-shared layout) and logs ``padding_fraction``, the share of computed
    positions that were padding.

    Unpaired rows (KTO, ``out.desirable`` set) are logged as TRL's KTOTrainer logs them: rewards/chosen and
    logps/chosen averaged over the desirable rows, rewards/rejected and logps/rejected over the undesirable ones,
    rewards/margins their difference, ``kl`` (z0), the class counts ``count/desirable`` and ``count/undesirable``,
    and rewards/accuracies as the loss defines it (the share of rows on their label's side of z0).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}  # each sum's denominator: the pairs (or rows of its class) it covers
        self.tokens = 0
        self.data_positions = self.computed_positions = 0

    def update(
        self, out: PreferenceLossOutput, policy: SequenceLogProbs, batch: dict[str, Tensor] | None = None
    ) -> None:
        n = out.losses.shape[0]
        if out.desirable is None:
            margins = out.chosen_rewards - out.rejected_rewards
            values = {
                "loss": out.losses.detach(),
                "rewards/chosen": out.chosen_rewards,
                "rewards/rejected": out.rejected_rewards,
                "rewards/margins": margins,
                "rewards/accuracies": (margins > 0).float() + 0.5 * (margins == 0).float(),
                "logps/chosen": policy.chosen_logps.detach(),
                "logps/rejected": policy.rejected_logps.detach(),
                **out.metrics,  # loss-specific, e.g. ipo/margin
            }
            counts = dict.fromkeys(values, n)
        else:
            good = out.desirable.bool()
            n_good = int(good.sum())
            logps = policy.chosen_logps.detach()
            values = {
                "loss": out.losses.detach(),
                "rewards/chosen": out.chosen_rewards[good], "rewards/rejected": out.chosen_rewards[~good],
                "logps/chosen": logps[good], "logps/rejected": logps[~good],
                "count/desirable": good.float(), "count/undesirable": (~good).float(),
                **out.metrics,  # kl, rewards/accuracies
            }  # fmt: skip
            counts = {**dict.fromkeys(values, n), "rewards/chosen": n_good, "logps/chosen": n_good,
                      "rewards/rejected": n - n_good, "logps/rejected": n - n_good}  # fmt: skip
        stacked = torch.stack([v.float().sum() for v in values.values()]).tolist()  # one device sync
        for name, total in zip(values, stacked):
            self.sums[name] = self.sums.get(name, 0.0) + total
            self.counts[name] = self.counts.get(name, 0) + counts[name]
        if batch is not None:
            self.tokens += int(batch["lengths"].sum())
            data, computed = batch_positions(batch)
            self.data_positions += data
            self.computed_positions += computed

    def compute(self) -> dict[str, float]:
        results = averages(self.sums, self.counts)
        if self.computed_positions:
            results["padding_fraction"] = 1 - self.data_positions / self.computed_positions
        return results


def averages(sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
    """Each metric's sum over its count (a class with no row in the interval is left out); the unpaired
    rewards/margins is the difference of the class averages."""
    results = {name: total if name in TOTALS else total / counts[name]
               for name, total in sums.items() if name in TOTALS or counts[name]}  # fmt: skip
    if "count/desirable" in sums and "rewards/chosen" in results and "rewards/rejected" in results:
        results["rewards/margins"] = results["rewards/chosen"] - results["rewards/rejected"]
    return results


def all_reduce_metrics(metrics: PreferenceMetrics, device: torch.device) -> dict[str, float]:
    """Sums over ranks of every metric sum and count and of the token and position counts -> averages over all pairs
    (or rows of a class) of all ranks, the total token count (``tokens``) and the padding fraction of all ranks'
    batches (collective)."""
    names = sorted(metrics.sums)
    counts = [metrics.tokens, metrics.data_positions, metrics.computed_positions]
    totals = torch.tensor([metrics.sums[n] for n in names] + [metrics.counts[n] for n in names] + counts,
                          dtype=torch.float64, device=device)  # fmt: skip
    dist.all_reduce(totals)
    values = totals.tolist()
    averaged = averages(dict(zip(names, values[: len(names)])), dict(zip(names, values[len(names) : 2 * len(names)])))
    tokens, data_positions, computed_positions = values[-3:]
    averaged["tokens"] = tokens
    if computed_positions:
        averaged["padding_fraction"] = 1 - data_positions / computed_positions
    return averaged


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


class ZeroGradientWatch:
    """Warns, once, when the gradient norm is exactly 0 for ``patience`` optimizer steps in a row: the loss is
    saturated and the run trains nothing while its loss still prints. KTO does this on unbalanced classes without
    the weight correction: the desirable rows fall far below z0, where the sigmoid is flat
    (docs/losses.md#kto-unpaired-feedback). The run goes on; the warning says what to change."""

    def __init__(self, loss: object, patience: int = 5) -> None:
        self.loss_name, self.patience = type(loss).__name__, patience
        self.zero_steps, self.warned = 0, False
        unpaired = getattr(loss, "data_kind", "pairs") == "unpaired"
        self.hint = ("; with unbalanced classes set the weights the setup warning names (loss.desirable_weight or "
                     "loss.undesirable_weight)") if unpaired else ""

    def update(self, grad_norm: float, step: int) -> str | None:
        """Record the norm of optimizer step ``step``; returns the warning when it is issued (and logs it)."""
        self.zero_steps = self.zero_steps + 1 if grad_norm == 0.0 else 0
        if self.zero_steps < self.patience or self.warned:
            return None
        self.warned = True
        steps = f"steps {step - self.patience + 1}-{step}"
        message = (f"the gradient norm was exactly 0 for {self.patience} steps in a row ({steps}): "
                   f"{self.loss_name} is saturated and nothing trains{self.hint}")  # fmt: skip
        log.warning(message)
        return message


class DisplacementWatch:
    """Warns, once, when the chosen responses' log-probs keep falling while the margin grows: likelihood
    displacement (docs/losses.md#likelihood-displacement). Fed the logged averages of each log line; it looks at
    the log lines of the last ``window`` steps (at least the last 3 lines, so that a long logging interval is
    watched too) and fires when, from step ``min_step`` on, all of these hold:

    - on average over those lines, at least ``below_share`` of the pairs have their chosen log-prob below the
      reference's (``displacement/chosen_below_reference``);
    - the chosen log-prob per token is ``min_fall`` nats below the reference's or more
      (``displacement/chosen_logp_change``), and lower than at the window's start: it is still falling;
    - the margin (``rewards/margins``) is larger than at the window's start.

    A size threshold, not only a sign: on healthy runs the chosen log-probs dip a little below the reference
    while the margin grows. The thresholds come from the tiny task's study (docs); the run goes on, and the warning
    names what to try."""

    def __init__(self, window: int = 20, min_step: int = 20, below_share: float = 0.7, min_fall: float = 0.1) -> None:
        self.window, self.min_step, self.below_share, self.min_fall = window, min_step, below_share, min_fall
        self.lines: list[tuple[int, dict[str, float]]] = []
        self.warned_at: int | None = None

    def update(self, step: int, logged: dict[str, float]) -> str | None:
        """Record the log line of step ``step``; returns the warning when it is issued (and logs it)."""
        if "displacement/chosen_logp_change" not in logged or "rewards/margins" not in logged:
            return None  # a loss without a reference, or unpaired rows
        self.lines.append((step, logged))
        recent = [(s, v) for s, v in self.lines if s > step - self.window]
        self.lines = recent if len(recent) >= 3 else self.lines[-3:]  # logging every >= window/2 steps: 3 lines
        if self.warned_at is not None or step < self.min_step or len(self.lines) < 2:
            return None
        (first_step, first), last = self.lines[0], logged
        share = sum(v["displacement/chosen_below_reference"] for _, v in self.lines) / len(self.lines)
        change = last["displacement/chosen_logp_change"]
        falling = change <= -self.min_fall and change < first["displacement/chosen_logp_change"]
        if not (share >= self.below_share and falling and last["rewards/margins"] > first["rewards/margins"]):
            return None
        self.warned_at = step
        message = (
            f"the chosen responses' log-probs fell below the reference's in {share:.0%} of pairs over steps "
            f"{first_step}-{step} ({change:+.2f} nats per token, from {first['displacement/chosen_logp_change']:+.2f}"
            f") while the margin grew ({first['rewards/margins']:.2f} -> {last['rewards/margins']:.2f}): likelihood "
            f"displacement, the rejected ones pushed down and the chosen with them. Try loss.nll_weight=1.0 (RPO's "
            "NLL term) or dpo_components.losses.DPOPLoss, or filter the most similar pairs "
            "(python -m dpo_components.tools.audit); see docs/losses.md#likelihood-displacement"
        )
        log.warning(message)
        return message
