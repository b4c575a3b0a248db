"""Pairwise preference losses (DPO family) behind one interface.

Every loss is an ``nn.Module`` called as ``loss(policy, reference)`` where both arguments are
:class:`SequenceLogProbs`: per-sequence log-prob **sums** and response **token counts** for the chosen and the
rejected response of each pair. The loss returns a :class:`PreferenceLossOutput` with per-pair losses (the recipe
takes the mean) and the detached implicit rewards used for metrics.

Two decisions belong to the loss, not to the recipe:

- ``average_logprobs``: whether the loss works on summed log-probs (DPO as published) or on per-token averages
  (IPO as its authors confirmed, SimPO). The loss divides by the token counts itself.
- ``needs_reference``: reference-free losses (SimPO) set it to ``False``; the recipe then skips the reference
  forward and passes ``reference=None``.

Notation in the docstrings: for pair i, ``pi_w, pi_l`` are the policy log-probs of the chosen (winner) and
rejected (loser) responses, ``ref_w, ref_l`` the reference's, ``|y_w|, |y_l|`` the response token counts,
``h = (pi_w - ref_w) - (pi_l - ref_l)`` the log-ratio margin and ``L(z) = -log sigmoid(z)``.

Any loss takes ``nll_weight`` (alpha): it adds the RPO term (Pang et al. 2024, arXiv 2404.19733)
``alpha * NLL(y_w) / |y_w|``, the per-token negative log-likelihood of the chosen response under the policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class SequenceLogProbs:
    """Per-pair sequence log-probs of one model: sums over response tokens, and the token counts. Shapes [B]."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor

    @classmethod
    def from_concatenated(cls, logps: Tensor, tokens: Tensor) -> SequenceLogProbs:
        """Split the [2B] output of one concatenated forward (chosen rows first, then rejected)."""
        chosen_logps, rejected_logps = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        return cls(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens)

    def averaged(self) -> SequenceLogProbs:
        """Per-token averages instead of sums (the token counts are kept)."""
        return SequenceLogProbs(
            self.chosen_logps / self.chosen_tokens,
            self.rejected_logps / self.rejected_tokens,
            self.chosen_tokens,
            self.rejected_tokens,
        )


@dataclass
class PreferenceLossOutput:
    """``losses``: per pair, differentiable, shape [B]. Rewards: detached, on the log-probs the loss used."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


class PreferenceLoss(nn.Module):
    """Base class: validates inputs, applies the sum/average choice, adds the optional NLL term.

    Subclasses implement :meth:`pair_losses` on already-averaged (or summed) log-probs and set
    ``needs_reference`` as a class attribute.
    """

    needs_reference: bool = True

    def __init__(self, beta: float, *, average_logprobs: bool = False, nll_weight: float = 0.0) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"{type(self).__name__}: beta must be > 0, got {beta}")
        if nll_weight < 0:
            raise ValueError(f"{type(self).__name__}: nll_weight must be >= 0, got {nll_weight}")
        self.beta = beta
        self.average_logprobs = average_logprobs
        self.nll_weight = nll_weight

    def forward(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> PreferenceLossOutput:
        _check_token_counts(policy, "policy")
        if self.needs_reference:
            if reference is None:
                raise ValueError(f"{type(self).__name__} needs reference log-probs, got reference=None")
            _check_token_counts(reference, "reference")
        if self.average_logprobs:
            policy_in = policy.averaged()
            reference_in = reference.averaged() if reference is not None else None
        else:
            policy_in, reference_in = policy, reference
        losses, chosen_rewards, rejected_rewards = self.pair_losses(policy_in, reference_in)
        if self.nll_weight:
            losses = losses - self.nll_weight * policy.chosen_logps / policy.chosen_tokens
        return PreferenceLossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())

    def pair_losses(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Return (per-pair losses, chosen rewards, rejected rewards), each of shape [B]."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"beta={self.beta}, average_logprobs={self.average_logprobs}, nll_weight={self.nll_weight}"


def _check_token_counts(logps: SequenceLogProbs, who: str) -> None:
    for name, tokens in (("chosen", logps.chosen_tokens), ("rejected", logps.rejected_tokens)):
        empty = (tokens <= 0).nonzero().flatten()
        if empty.numel():
            raise ValueError(
                f"{who} {name} responses of pair(s) {empty.tolist()} in this batch have zero response tokens; "
                "a pair without response tokens has no preference to learn (check truncation in the dataset)"
            )


def _log_ratios(policy: SequenceLogProbs, reference: SequenceLogProbs) -> tuple[Tensor, Tensor]:
    """(pi_w - ref_w, pi_l - ref_l)."""
    return policy.chosen_logps - reference.chosen_logps, policy.rejected_logps - reference.rejected_logps


class DPOLoss(PreferenceLoss):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290), with conservative DPO's label smoothing.

        loss = (1 - eps) * L(beta * h) + eps * L(-beta * h)

    on summed log-probs; rewards are ``beta * (pi - ref)``. ``label_smoothing`` eps in [0, 0.5) is the assumed
    fraction of flipped labels (cDPO, Mitchell 2023, https://ericmitchell.ai/cdpo.pdf), as in the original DPO
    code's ``preference_loss``. TRL 1.16's ``sigmoid`` loss silently ignores ``label_smoothing``; we apply it.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, nll_weight: float = 0.0) -> None:
        super().__init__(beta, nll_weight=nll_weight)
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"DPOLoss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def pair_losses(self, policy, reference):
        chosen, rejected = _log_ratios(policy, reference)
        logits = self.beta * (chosen - rejected)
        eps = self.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        return losses, self.beta * chosen, self.beta * rejected


class RobustDPOLoss(PreferenceLoss):
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409): unbiased under a known label-flip rate eps.

        loss = [(1 - eps) * L(beta * h) - eps * L(-beta * h)] / (1 - 2 * eps)

    on summed log-probs; equals TRL's ``robust`` loss. eps must be in [0, 0.5).
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1, nll_weight: float = 0.0) -> None:
        super().__init__(beta, nll_weight=nll_weight)
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"RobustDPOLoss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def pair_losses(self, policy, reference):
        chosen, rejected = _log_ratios(policy, reference)
        logits = self.beta * (chosen - rejected)
        eps = self.label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
        return losses, self.beta * chosen, self.beta * rejected


class IPOLoss(PreferenceLoss):
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17), with ``beta`` in the role of the paper's tau.

        loss = (h - 1 / (2 * beta))^2

    By default on **per-token averaged** log-probs (``average_logprobs=True``), as TRL does since PR #1265 after
    confirming with the IPO authors; ``average_logprobs=False`` gives the summed version of the original DPO
    code and OpenRLHF. Summed log-probs make h grow with length, so the target 1/(2 beta) means something else.
    """

    def __init__(self, beta: float = 0.1, average_logprobs: bool = True, nll_weight: float = 0.0) -> None:
        super().__init__(beta, average_logprobs=average_logprobs, nll_weight=nll_weight)

    def pair_losses(self, policy, reference):
        chosen, rejected = _log_ratios(policy, reference)
        losses = (chosen - rejected - 1 / (2 * self.beta)) ** 2
        return losses, self.beta * chosen, self.beta * rejected


class HingeLoss(PreferenceLoss):
    """Hinge loss of SLiC (Zhao et al. 2023, arXiv 2305.10425) and RSO (Liu et al. 2023, arXiv 2309.06657).

        loss = max(0, 1 - beta * h)

    on summed log-probs; equals TRL's ``hinge`` and torchtune's ``RSOLoss`` (whose ``gamma`` is our ``beta``).
    """

    def __init__(self, beta: float = 0.1, nll_weight: float = 0.0) -> None:
        super().__init__(beta, nll_weight=nll_weight)

    def pair_losses(self, policy, reference):
        chosen, rejected = _log_ratios(policy, reference)
        losses = torch.relu(1 - self.beta * (chosen - rejected))
        return losses, self.beta * chosen, self.beta * rejected


class SimPOLoss(PreferenceLoss):
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6): reference-free and length-normalised, margin gamma.

        loss = (1 - eps) * L(z) + eps * L(-z),   z = beta * pi_w / |y_w| - beta * pi_l / |y_l| - gamma

    Rewards are ``beta * pi / |y|``. No reference model is needed (``needs_reference = False``). The paper's
    defaults are beta in [2, 2.5] and gamma / beta around 0.5; TRL's CPOTrainer takes the same gamma as
    ``simpo_gamma`` (its margin is gamma / beta inside beta * (...), i.e. the same z).
    """

    needs_reference = False

    def __init__(
        self, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0, nll_weight: float = 0.0
    ) -> None:
        super().__init__(beta, average_logprobs=True, nll_weight=nll_weight)
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"SimPOLoss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def pair_losses(self, policy, reference):
        chosen, rejected = self.beta * policy.chosen_logps, self.beta * policy.rejected_logps
        logits = chosen - rejected - self.gamma
        eps = self.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        return losses, chosen, rejected
