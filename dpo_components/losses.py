"""Pairwise preference losses (DPO family) behind one interface.

Every loss is an ``nn.Module`` called as ``loss(policy, reference)`` where both arguments are
:class:`SequenceLogProbs`: per-sequence log-prob **sums** and response **token counts** for the chosen and the
rejected response of each pair. The loss returns a :class:`PreferenceLossOutput` with per-pair losses (the recipe
takes the mean) and the detached implicit rewards used for metrics.

Two decisions belong to the loss, not to the recipe:

- ``average_logprobs``: whether the loss works on summed log-probs (DPO as published) or on per-token averages
  (IPO as its authors confirmed, SimPO). The loss divides by the token counts itself, after taking the
  policy-reference difference: ``(pi - ref) / |y|``, not ``pi / |y| - ref / |y|``, which loses precision.
- ``needs_reference``: reference-free losses (SimPO) set it to ``False``; the recipe then skips the reference
  forward and passes ``reference=None``.

Notation in the docstrings: for pair i, ``pi_w, pi_l`` are the policy log-probs of the chosen (winner) and
rejected (loser) responses, ``ref_w, ref_l`` the reference's, ``|y_w|, |y_l|`` the response token counts,
``h = (pi_w - ref_w) - (pi_l - ref_l)`` the log-ratio margin and ``L(z) = -log sigmoid(z)``.

Unpaired feedback (KTO): :class:`KTOLoss` and :class:`APOZeroUnpairedLoss` (``data_kind = "unpaired"``, at the end
of the file) take rows of (prompt, completion, label) in the same interface; see :class:`UnpairedLoss`.

Any pairwise loss takes ``nll_weight`` (alpha): it adds the RPO term (Pang et al. 2024, arXiv 2404.19733)
``alpha * NLL(y_w) / |y_w|``, the per-token negative log-likelihood of the chosen response under the policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class SequenceLogProbs:
    """Per-pair sequence log-probs of one model: sums over response tokens, and the token counts. Shapes [B].

    For unpaired data (KTO; ``dpo_components.data.unpaired``) the *chosen* fields hold each row's completion, the
    *rejected* fields its mismatched KL completion, and ``desirable`` [B] (bool) the rows' labels; it is None for
    pairs.
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    desirable: Tensor | None = None

    @classmethod
    def from_concatenated(cls, logps: Tensor, tokens: Tensor, desirable: Tensor | None = None) -> SequenceLogProbs:
        """Split the [2B] output of one concatenated forward (chosen rows first, then rejected)."""
        chosen_logps, rejected_logps = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        return cls(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, desirable)

    def averaged(self) -> SequenceLogProbs:
        """Per-token averages instead of sums (the token counts are kept)."""
        return SequenceLogProbs(
            self.chosen_logps / self.chosen_tokens,
            self.rejected_logps / self.rejected_tokens,
            self.chosen_tokens,
            self.rejected_tokens,
            self.desirable,
        )


@dataclass
class PreferenceLossOutput:
    """``losses``: per pair, differentiable, shape [B]. Rewards: detached, on the log-probs the loss used.

    ``metrics``: loss-specific per-pair quantities (detached, shape [B]) that recipes average and log next to the
    reward metrics, e.g. IPO's margin ``ipo/margin`` and its target.

    Unpaired losses (KTO) set ``desirable`` [B]; then ``chosen_rewards`` is each row's reward and
    ``rejected_rewards`` the reward of its KL completion, and :class:`~dpo_components.metrics.PreferenceMetrics`
    averages the rewards per class.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    desirable: Tensor | None = None


class PreferenceLoss(nn.Module):
    """Base class: validates inputs, adds the optional NLL term, and gives subclasses the log-probs they use.

    Subclasses implement :meth:`pair_losses` on the summed log-probs, taking :meth:`log_ratios` (per token when
    ``average_logprobs``) and :meth:`policy_logps`, and set ``needs_reference`` as a class attribute.
    ``data_kind`` says what the loss trains on: ``"pairs"`` (every loss here but KTO's) or ``"unpaired"``
    (:class:`KTOLoss`, :class:`APOZeroUnpairedLoss`), matching the dataset's ``data_kind``. ``batch_coupled``: a
    row's loss depends on the other rows of its micro-batch (AOT sorts them, the unpaired losses take their KL
    completions), so the micro-batch size is part of the loss and ``max_micro_batch_tokens`` is refused.
    """

    needs_reference: bool = True
    data_kind: str = "pairs"
    batch_coupled: bool = False

    def __init__(self, beta: float, *, average_logprobs: bool = False, nll_weight: float = 0.0) -> None:
        super().__init__()
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"{type(self).__name__}: beta must be finite and > 0, got {beta}")
        if not (math.isfinite(nll_weight) and nll_weight >= 0):
            raise ValueError(f"{type(self).__name__}: nll_weight must be finite and >= 0, got {nll_weight}")
        self.beta = beta
        self.average_logprobs = average_logprobs
        self.nll_weight = nll_weight

    def forward(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> PreferenceLossOutput:
        batch_size = _check_logps(policy, "policy")
        _check_data_kind(self, policy)
        if self.needs_reference:
            if reference is None:
                raise ValueError(f"{type(self).__name__} needs reference log-probs, got reference=None")
            if _check_logps(reference, "reference") != batch_size:
                raise ValueError(f"policy log-probs are for {batch_size} pairs, reference log-probs for "
                                 f"{reference.chosen_logps.shape[0]}")  # fmt: skip
        losses, chosen_rewards, rejected_rewards = self.pair_losses(policy, reference)
        if self.nll_weight:
            losses = losses + self.nll_weight * chosen_nll(policy)
        metrics = {name: value.detach() for name, value in self.pair_metrics(policy, reference).items()}
        if reference is not None and self.data_kind == "pairs":
            metrics.update(self.displacement_metrics(policy, reference))
        return PreferenceLossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach(), metrics)

    def displacement_metrics(self, policy: SequenceLogProbs, reference: SequenceLogProbs) -> dict[str, Tensor]:
        """Per pair, what says whether the chosen response is being pushed down with the rejected one (likelihood
        displacement, Razin et al. 2024, arXiv 2410.08847; docs/losses.md#likelihood-displacement), with
        c = pi_w - ref_w and r = pi_l - ref_l (the change since the reference, the start model):

        - ``displacement/chosen_below_reference``: c < 0;
        - ``displacement/both_below_reference``: c < 0 and r < 0 (the margin grows by pushing both down);
        - ``displacement/chosen_logp_change``, ``rejected_logp_change``: c / |y_w| and r / |y_l|, nats per token;
        - ``displacement/saturated``: the pair's preference loss no longer moves it: the gradient of its loss
          with respect to (pi_w, pi_l) is below 1% of its size at a zero margin (pi = ref). For DPO that is
          sigmoid(-beta h) < 0.005, beta h > 5.3. The NLL term is left out: it always pulls the chosen one up.
        """
        c = (policy.chosen_logps - reference.chosen_logps).detach()
        r = (policy.rejected_logps - reference.rejected_logps).detach()
        now = self._preference_gradient(policy.chosen_logps, policy.rejected_logps, policy, reference)
        start = self._preference_gradient(reference.chosen_logps, reference.rejected_logps, policy, reference)
        return {
            "displacement/chosen_below_reference": (c < 0).float(),
            "displacement/both_below_reference": ((c < 0) & (r < 0)).float(),
            "displacement/chosen_logp_change": c.float() / policy.chosen_tokens,
            "displacement/rejected_logp_change": r.float() / policy.rejected_tokens,
            "displacement/saturated": (now < 0.01 * start).float(),
        }

    def _preference_gradient(
        self, chosen: Tensor, rejected: Tensor, policy: SequenceLogProbs, reference: SequenceLogProbs
    ) -> Tensor:
        """|d loss_i / d pi_w,i| + |d loss_i / d pi_l,i| of :meth:`pair_losses` at the policy log-probs (chosen,
        rejected): on detached copies, so the step's own graph is untouched (a few elementwise ops on [B])."""
        with torch.enable_grad():
            pc = chosen.detach().float().requires_grad_(True)
            pr = rejected.detach().float().requires_grad_(True)
            at = SequenceLogProbs(pc, pr, policy.chosen_tokens, policy.rejected_tokens)
            ref = SequenceLogProbs(*(t.detach().float() for t in (reference.chosen_logps, reference.rejected_logps)),
                                   reference.chosen_tokens, reference.rejected_tokens)  # fmt: skip
            losses = self.pair_losses(at, ref)[0]
            grads = torch.autograd.grad(losses.sum(), [pc, pr], allow_unused=True)
        return sum((g.abs() if g is not None else torch.zeros_like(pc)) for g in grads)

    def log_ratios(self, policy: SequenceLogProbs, reference: SequenceLogProbs) -> tuple[Tensor, Tensor]:
        """(pi_w - ref_w, pi_l - ref_l), divided by the token counts when ``average_logprobs``."""
        chosen = policy.chosen_logps - reference.chosen_logps
        rejected = policy.rejected_logps - reference.rejected_logps
        if self.average_logprobs:
            return chosen / policy.chosen_tokens, rejected / policy.rejected_tokens
        return chosen, rejected

    def policy_logps(self, policy: SequenceLogProbs) -> tuple[Tensor, Tensor]:
        """(pi_w, pi_l), per token when ``average_logprobs``: what reference-free losses work on."""
        logps = policy.averaged() if self.average_logprobs else policy
        return logps.chosen_logps, logps.rejected_logps

    def pair_losses(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Return (per-pair losses, chosen rewards, rejected rewards), each of shape [B], from summed log-probs."""
        raise NotImplementedError

    def pair_metrics(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None) -> dict[str, Tensor]:
        """Loss-specific quantities worth logging, per pair (none by default)."""
        return {}

    def extra_repr(self) -> str:
        return f"beta={self.beta}, average_logprobs={self.average_logprobs}, nll_weight={self.nll_weight}"


def _check_data_kind(loss: PreferenceLoss, policy: SequenceLogProbs) -> None:
    """A pairwise loss on unpaired rows (or the reverse) would train on nonsense pairs: refuse it."""
    unpaired = policy.desirable is not None
    if loss.data_kind == "unpaired" and not unpaired:
        raise ValueError(f"{type(loss).__name__} trains on unpaired rows (prompt, completion, label), but the "
                         "batch holds preference pairs: use dpo_components.data.unpaired_dataset (it unrolls pairs)")
    if loss.data_kind == "pairs" and unpaired:
        raise ValueError(f"{type(loss).__name__} trains on preference pairs, but the batch holds unpaired rows "
                         "(prompt, completion, label): use KTOLoss, or preference pairs")


def _check_logps(logps: SequenceLogProbs, who: str) -> int:
    """Check that all four tensors have one shape [B] with B >= 1 (no silent broadcasting), and that every
    response has at least one token; return B."""
    fields = ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")
    shapes = {name: tuple(getattr(logps, name).shape) for name in fields}
    if logps.desirable is not None:
        shapes["desirable"] = tuple(logps.desirable.shape)
    if len(set(shapes.values())) != 1 or len(shapes["chosen_logps"]) != 1:
        raise ValueError(f"{who} log-probs and token counts must all have one shape [B]; got {shapes}")
    if shapes["chosen_logps"][0] == 0:
        raise ValueError(f"{who} log-probs hold no pairs (B = 0): a loss over an empty batch is undefined")
    for name, tokens in (("chosen", logps.chosen_tokens), ("rejected", logps.rejected_tokens)):
        bad = (tokens <= 0).nonzero().flatten()
        if bad.numel():
            raise ValueError(
                f"{who} {name} responses of pair(s) {bad.tolist()} in this batch have non-positive token counts "
                f"{tokens[bad].tolist()}; a pair without response tokens has no preference to learn (check "
                "truncation in the dataset)"
            )
    return shapes["chosen_logps"][0]


def chosen_nll(policy: SequenceLogProbs) -> Tensor:
    """Per-pair negative log-likelihood of the chosen response per token, -pi_w / |y_w| (from summed log-probs)."""
    return -policy.chosen_logps / policy.chosen_tokens


def _smoothed_sigmoid_loss(logits: Tensor, eps: float) -> Tensor:
    """(1 - eps) * L(z) + eps * L(-z): the logistic loss with conservative label smoothing eps.

    Without smoothing the second term is left out, not multiplied by 0, so z = +inf (a rejected log-prob of
    -inf) gives 0 as in TRL, not 0 * inf = NaN."""
    loss = -(1 - eps) * F.logsigmoid(logits)
    return loss - eps * F.logsigmoid(-logits) if eps else loss


def _half_inverse(beta: float, owner: str) -> float:
    """1 / (2 beta), the regression target of IPO and SPPO; refused where float32 would make it inf."""
    target = 1 / (2 * beta)
    if target > torch.finfo(torch.float32).max:
        raise ValueError(f"{owner}: beta={beta} makes the target 1/(2 beta) = {target:.3g} overflow float32")
    return target


def _check_smoothing(owner: str, eps: float, low: float = 0.0) -> float:
    if not low <= eps < 0.5 or (low > 0 and eps <= 0):
        bound = "(0, 0.5)" if low > 0 else "[0, 0.5)"
        raise ValueError(f"{owner}: label_smoothing must be in {bound}, got {eps}")
    return eps


class DPOLoss(PreferenceLoss):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290), with conservative DPO's label smoothing.

        loss = (1 - eps) * L(beta * h) + eps * L(-beta * h)

    on summed log-probs; rewards are ``beta * (pi - ref)``. ``label_smoothing`` eps in [0, 0.5) is the assumed
    fraction of flipped labels (cDPO, Mitchell 2023, https://ericmitchell.ai/cdpo.pdf), as in the original DPO
    code's ``preference_loss``. TRL 1.16's ``sigmoid`` loss silently ignores ``label_smoothing``; we apply it.
    """

    def __init__(
        self, beta: float = 0.1, label_smoothing: float = 0.0, average_logprobs: bool = False, nll_weight: float = 0.0
    ) -> None:
        super().__init__(beta, average_logprobs=average_logprobs, nll_weight=nll_weight)
        self.label_smoothing = _check_smoothing(type(self).__name__, label_smoothing)

    def pair_losses(self, policy, reference):
        chosen, rejected = self.log_ratios(policy, reference)
        losses = _smoothed_sigmoid_loss(self.beta * (chosen - rejected), self.label_smoothing)
        return losses, self.beta * chosen, self.beta * rejected


class RobustDPOLoss(PreferenceLoss):
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409): unbiased under a known label-flip rate eps.

        loss = [(1 - eps) * L(beta * h) - eps * L(-beta * h)] / (1 - 2 * eps)

    on summed log-probs; equals TRL's ``robust`` loss. eps must be in [0, 0.5).
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1, nll_weight: float = 0.0) -> None:
        super().__init__(beta, nll_weight=nll_weight)
        self.label_smoothing = _check_smoothing(type(self).__name__, label_smoothing)

    def pair_losses(self, policy, reference):
        chosen, rejected = self.log_ratios(policy, reference)
        logits = self.beta * (chosen - rejected)
        eps = self.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(logits)
        if eps:  # left out at eps = 0 (not 0 * inf): see _smoothed_sigmoid_loss
            losses = losses + eps * F.logsigmoid(-logits)
        losses = losses / (1 - 2 * eps)
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
        _half_inverse(beta, type(self).__name__)  # refuse a beta whose target overflows, at construction

    def pair_losses(self, policy, reference):
        chosen, rejected = self.log_ratios(policy, reference)
        losses = (chosen - rejected - self.target) ** 2
        return losses, self.beta * chosen, self.beta * rejected

    @property
    def target(self) -> float:
        """The margin IPO regresses h onto, 1 / (2 tau)."""
        return _half_inverse(self.beta, type(self).__name__)

    def pair_metrics(self, policy, reference):
        chosen, rejected = self.log_ratios(policy, reference)
        margin = chosen - rejected
        return {"ipo/margin": margin, "ipo/target": torch.full_like(margin, self.target),
                "ipo/abs_gap": (margin - self.target).abs()}  # fmt: skip


class HingeLoss(PreferenceLoss):
    """Hinge loss of SLiC (Zhao et al. 2023, arXiv 2305.10425) and RSO (Liu et al. 2023, arXiv 2309.06657).

        loss = max(0, 1 - beta * h)

    on summed log-probs; equals TRL's ``hinge`` and torchtune's ``RSOLoss`` (whose ``gamma`` is our ``beta``).
    """

    def __init__(self, beta: float = 0.1, nll_weight: float = 0.0) -> None:
        super().__init__(beta, nll_weight=nll_weight)

    def pair_losses(self, policy, reference):
        chosen, rejected = self.log_ratios(policy, reference)
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
        self.gamma = gamma
        self.label_smoothing = _check_smoothing(type(self).__name__, label_smoothing)

    def pair_losses(self, policy, reference):
        chosen, rejected = (self.beta * x for x in self.policy_logps(policy))
        losses = _smoothed_sigmoid_loss(chosen - rejected - self.gamma, self.label_smoothing)
        return losses, chosen, rejected


class SigmoidNormLoss(DPOLoss):
    """Length-normalised DPO (TRL's ``sigmoid_norm``; the "DPO w/ LN" ablation of SimPO, Tulu 3's ``dpo_norm``).

        loss = L(beta * (h_w / |y_w| - h_l / |y_l|)),   h_y = pi_y - ref_y

    i.e. :class:`DPOLoss` on per-token averaged log-probs. Equals TRL 1.16's ``sigmoid_norm``.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, nll_weight: float = 0.0) -> None:
        super().__init__(beta, label_smoothing=label_smoothing, average_logprobs=True, nll_weight=nll_weight)


class EXOPairLoss(PreferenceLoss):
    """EXO (Ji et al. 2024, arXiv 2402.00856, Eq. 16): reverse KL between sigma(beta h) and the labels [1-eps, eps].

        loss = s(z) (log s(z) - log(1 - eps)) + s(-z) (log s(-z) - log eps),   z = beta * h,  s = sigmoid

    on summed log-probs; eps > 0 is required (the paper uses 1e-3). Equals TRL 1.16's ``exo_pair``.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 1e-3, nll_weight: float = 0.0) -> None:
        super().__init__(beta, nll_weight=nll_weight)
        self.label_smoothing = _check_smoothing(type(self).__name__, label_smoothing, low=1e-12)

    def pair_losses(self, policy, reference):
        chosen, rejected = self.log_ratios(policy, reference)
        z, eps = self.beta * (chosen - rejected), self.label_smoothing
        losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(eps)
        )
        return losses, self.beta * chosen, self.beta * rejected


class NCAPairLoss(PreferenceLoss):
    """NCA (Chen et al. 2024, arXiv 2402.05369), pairwise: absolute rewards r = beta * (pi - ref), not only h.

        loss = L(r_w) + 0.5 * L(-r_w) + 0.5 * L(-r_l)

    on summed log-probs. Equals TRL 1.16's ``nca_pair``.
    """

    def __init__(self, beta: float = 0.1, nll_weight: float = 0.0) -> None:
        super().__init__(beta, nll_weight=nll_weight)

    def pair_losses(self, policy, reference):
        chosen, rejected = (self.beta * x for x in self.log_ratios(policy, reference))
        losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
        return losses, chosen, rejected


class BCOPairLoss(PreferenceLoss):
    """BCO, pairwise (Jung et al. 2024, arXiv 2404.04656): each response classified on its own reward.

        loss = L(r_w) + L(-r_l),   r = beta * (pi - ref)

    on summed log-probs. As in TRL 1.16's ``bco_pair`` there is no running-mean reward shift delta (the paper's
    and older TRL's version subtract a running mean of the rewards from r; that couples batches and steps).
    """

    def __init__(self, beta: float = 0.1, nll_weight: float = 0.0) -> None:
        super().__init__(beta, nll_weight=nll_weight)

    def pair_losses(self, policy, reference):
        chosen, rejected = (self.beta * x for x in self.log_ratios(policy, reference))
        return -F.logsigmoid(chosen) - F.logsigmoid(-rejected), chosen, rejected


class SPPOHardLoss(PreferenceLoss):
    """SPPO with hard labels (Wu et al. 2024, arXiv 2405.00675, Eq. 4.7 with P = 1 for the winner, 0 the loser).

        loss = (h_w - 1 / (2 beta))^2 + (h_l + 1 / (2 beta))^2,   h_y = pi_y - ref_y

    on summed log-probs. Equals TRL 1.16's ``sppo_hard``.
    """

    def __init__(self, beta: float = 0.1, nll_weight: float = 0.0) -> None:
        super().__init__(beta, nll_weight=nll_weight)
        _half_inverse(beta, type(self).__name__)

    def pair_losses(self, policy, reference):
        chosen, rejected = self.log_ratios(policy, reference)
        half = _half_inverse(self.beta, type(self).__name__)
        return (chosen - half) ** 2 + (rejected + half) ** 2, self.beta * chosen, self.beta * rejected


class AOTLoss(PreferenceLoss):
    """AOT (Melnyk et al. 2024, arXiv 2406.05882): distributional alignment via optimal transport over the batch.

        paired (default):  d = sort_batch(pi_w - pi_l) - sort_batch(ref_w - ref_l)
        unpaired:          d = sort_batch(pi_w - ref_w) - sort_batch(pi_l - ref_l)
        loss = (1 - eps) L(beta d) + eps L(-beta d)

    on summed log-probs; equals TRL 1.16's ``aot`` and ``aot_unpaired``. **Batch-coupled**: the i-th loss pairs the
    i-th smallest values of the micro-batch, so results depend on the micro-batch size (and, with gradient
    accumulation, only each micro-batch is sorted).
    """

    batch_coupled = True

    def __init__(
        self, beta: float = 0.1, label_smoothing: float = 0.0, unpaired: bool = False, nll_weight: float = 0.0
    ) -> None:
        super().__init__(beta, nll_weight=nll_weight)
        self.label_smoothing = _check_smoothing(type(self).__name__, label_smoothing)
        self.unpaired = unpaired

    def pair_losses(self, policy, reference):
        chosen, rejected = self.log_ratios(policy, reference)
        if self.unpaired:
            d = chosen.sort().values - rejected.sort().values
        else:
            policy_margin = policy.chosen_logps - policy.rejected_logps
            reference_margin = reference.chosen_logps - reference.rejected_logps
            d = policy_margin.sort().values - reference_margin.sort().values
        return _smoothed_sigmoid_loss(self.beta * d, self.label_smoothing), self.beta * chosen, self.beta * rejected


class APOZeroLoss(PreferenceLoss):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7), for chosen responses better than the model's.

        loss = (1 - s(r_w)) + s(r_l),   r = beta * (pi - ref),  s = sigmoid

    on summed log-probs. Equals TRL 1.16's ``apo_zero``.
    """

    def __init__(self, beta: float = 0.1, nll_weight: float = 0.0) -> None:
        super().__init__(beta, nll_weight=nll_weight)

    def pair_losses(self, policy, reference):
        chosen, rejected = (self.beta * x for x in self.log_ratios(policy, reference))
        return (1 - torch.sigmoid(chosen)) + torch.sigmoid(rejected), chosen, rejected


class APODownLoss(PreferenceLoss):
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8), for chosen responses worse than the model's own outputs.

        loss = s(r_w) + (1 - s(r_w - r_l)),   r = beta * (pi - ref)

    on summed log-probs. Equals TRL 1.16's ``apo_down``.
    """

    def __init__(self, beta: float = 0.1, nll_weight: float = 0.0) -> None:
        super().__init__(beta, nll_weight=nll_weight)

    def pair_losses(self, policy, reference):
        chosen, rejected = (self.beta * x for x in self.log_ratios(policy, reference))
        return torch.sigmoid(chosen) + (1 - torch.sigmoid(chosen - rejected)), chosen, rejected


class DiscoPOPLoss(PreferenceLoss):
    """DiscoPOP (Chris Lu et al. 2024, arXiv 2406.08414, Eq. 5): a log-ratio-modulated blend found by LLM search.

        z = beta * h,  m = sigmoid(z / tau):   loss = (1 - m) * L(z) + m * exp(-z)

    on summed log-probs, tau = 0.05 as in the paper. Equals TRL 1.16's ``discopop``.
    """

    def __init__(self, beta: float = 0.1, tau: float = 0.05, nll_weight: float = 0.0) -> None:
        super().__init__(beta, nll_weight=nll_weight)
        if tau <= 0:
            raise ValueError(f"DiscoPOPLoss: tau must be > 0, got {tau}")
        self.tau = tau

    def pair_losses(self, policy, reference):
        chosen, rejected = self.log_ratios(policy, reference)
        z = self.beta * (chosen - rejected)
        m = torch.sigmoid(z / self.tau)
        return (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z), self.beta * chosen, self.beta * rejected


class DPOPLoss(PreferenceLoss):
    """DPO-Positive (Pal et al. 2024, "Smaug", arXiv 2402.13228): DPO plus a penalty whenever the chosen
    response's likelihood falls below the reference's, which plain DPO allows (both likelihoods may drop).

        loss = L(beta * (h - lambda * max(0, ref_w - pi_w)))

    on summed log-probs; ``dpop_lambda`` defaults to 50, the value the paper trains Smaug with. Not in TRL 1.16.
    """

    def __init__(self, beta: float = 0.1, dpop_lambda: float = 50.0, nll_weight: float = 0.0) -> None:
        super().__init__(beta, nll_weight=nll_weight)
        if dpop_lambda < 0:
            raise ValueError(f"DPOPLoss: dpop_lambda must be >= 0, got {dpop_lambda}")
        self.dpop_lambda = dpop_lambda

    def pair_losses(self, policy, reference):
        chosen, rejected = self.log_ratios(policy, reference)
        penalty = torch.relu(reference.chosen_logps - policy.chosen_logps)
        losses = -F.logsigmoid(self.beta * (chosen - rejected - self.dpop_lambda * penalty))
        return losses, self.beta * chosen, self.beta * rejected


class RDPOLoss(PreferenceLoss):
    """R-DPO, length-regularised DPO (Park et al. 2024, arXiv 2403.19159, Eq. 9; as tabulated in SimPO's Table 3):

        loss = L(beta * h + alpha * (|y_w| - |y_l|))

    on summed log-probs. With alpha > 0 a longer chosen response needs a smaller log-ratio margin, which removes
    the incentive to prefer length that plain DPO learns from length-biased data. Not in TRL 1.16.
    """

    def __init__(self, beta: float = 0.1, alpha: float = 0.01, nll_weight: float = 0.0) -> None:
        super().__init__(beta, nll_weight=nll_weight)
        self.alpha = alpha

    def pair_losses(self, policy, reference):
        chosen, rejected = self.log_ratios(policy, reference)
        length_gap = (policy.chosen_tokens - policy.rejected_tokens).to(chosen.dtype)
        losses = -F.logsigmoid(self.beta * (chosen - rejected) + self.alpha * length_gap)
        return losses, self.beta * chosen, self.beta * rejected


class CPOLoss(PreferenceLoss):
    """CPO (Xu et al. 2024, arXiv 2401.08417), reference-free: a DPO-style term on the policy alone plus NLL.

        loss = (1 - eps) L(beta (pi_w - pi_l)) + eps L(-beta (pi_w - pi_l)) + alpha * NLL(y_w) / |y_w|

    on summed log-probs; rewards ``beta * pi``. TRL's CPOTrainer (``loss_type="sigmoid"``, ``cpo_alpha``) has the
    same preference term; its NLL is the token mean over the whole batch, ours per pair (equal for equal lengths).
    """

    needs_reference = False

    def __init__(self, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__(beta)
        self.alpha = alpha
        self.label_smoothing = _check_smoothing(type(self).__name__, label_smoothing)

    def pair_losses(self, policy, reference):
        chosen, rejected = (self.beta * x for x in self.policy_logps(policy))
        losses = _smoothed_sigmoid_loss(chosen - rejected, self.label_smoothing) + self.alpha * chosen_nll(policy)
        return losses, chosen, rejected


class ORPOLoss(PreferenceLoss):
    """ORPO (Hong et al. 2024, arXiv 2403.07691), reference-free: NLL plus an odds-ratio term, in one stage.

        p_y = exp(pi_y / |y|),  odds_y = p_y / (1 - p_y)
        loss = NLL(y_w) / |y_w| - beta * log sigmoid(log odds_w - log odds_l)

    ``beta`` is the paper's lambda (0.1 there and in TRL). Rewards are ``beta * pi / |y|`` as TRL's ORPOTrainer
    logs them. TRL's NLL is the token mean over the batch, ours per pair (equal for equal lengths).
    """

    needs_reference = False

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__(beta, average_logprobs=True)

    def pair_losses(self, policy, reference):
        w, l = self.policy_logps(policy)  # noqa: E741 (per-token averages)
        log_odds = (w - l) - (torch.log(-torch.expm1(w)) - torch.log(-torch.expm1(l)))
        losses = -w - self.beta * F.logsigmoid(log_odds)
        return losses, self.beta * w, self.beta * l

    def pair_metrics(self, policy, reference):
        w, l = self.policy_logps(policy)  # noqa: E741
        return {"orpo/log_odds": (w - l) - (torch.log(-torch.expm1(w)) - torch.log(-torch.expm1(l)))}


class NLLLoss(PreferenceLoss):
    """Supervised NLL of the chosen response per token, -pi_w / |y_w|: the SFT term of combinations such as
    ``DPO + 0.2 * NLL`` (RPO, MPO). Reference-free; the ``beta`` only scales the logged rewards ``beta * pi / |y|``."""

    needs_reference = False

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__(beta)

    def pair_losses(self, policy, reference):
        averaged = policy.averaged()
        return chosen_nll(policy), self.beta * averaged.chosen_logps, self.beta * averaged.rejected_logps


class WeightedSum(PreferenceLoss):
    """A weighted sum of losses, e.g. DPO + 0.2 * NLL, built from YAML:

        loss:
          _component_: dpo_components.losses.WeightedSum
          terms:
            - {weight: 1.0, loss: {_component_: dpo_components.losses.DPOLoss, beta: 0.1}}
            - {weight: 0.2, loss: {_component_: dpo_components.losses.NLLLoss}}

    Each term sees the log-probs it asks for (summed or averaged); the reference is needed if any term needs it.
    Rewards come from the first term; every term's loss is logged as ``loss/<i>_<Class>``.
    """

    def __init__(self, terms: list[Any]) -> None:
        losses, weights = [], []
        for i, term in enumerate(terms):
            term = dict(term)
            loss = term["loss"]
            if not isinstance(loss, PreferenceLoss):
                from omegaconf import OmegaConf
                from torchtune import config

                loss = config.instantiate(OmegaConf.create(dict(loss)))
            if not isinstance(loss, PreferenceLoss):
                raise ValueError(f"WeightedSum term {i}: {type(loss).__name__} is not a PreferenceLoss")
            losses.append(loss)
            weights.append(float(term.get("weight", 1.0)))
        if not losses:
            raise ValueError("WeightedSum needs at least one term")
        kinds = {loss.data_kind for loss in losses}
        if len(kinds) > 1:
            raise ValueError("WeightedSum: the terms mix losses of preference pairs and of unpaired rows (KTO); "
                             "a batch holds one kind")  # fmt: skip
        super().__init__(beta=losses[0].beta)
        self.terms = nn.ModuleList(losses)
        self.weights = weights
        self.needs_reference = any(loss.needs_reference for loss in losses)
        self.batch_coupled = any(loss.batch_coupled for loss in losses)
        self.data_kind = kinds.pop()

    def forward(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> PreferenceLossOutput:
        outputs = [loss(policy, reference if loss.needs_reference else None) for loss in self.terms]
        total = sum(w * out.losses for w, out in zip(self.weights, outputs))
        metrics = {}
        key = "displacement/saturated"
        saturated = [out.metrics[key] for out in outputs if key in out.metrics]
        for i, (loss, out) in enumerate(zip(self.terms, outputs)):
            metrics[f"loss/{i}_{type(loss).__name__}"] = out.losses.detach()
            metrics.update(out.metrics)
        if saturated:  # a pair the sum no longer moves: every term with a reference leaves it alone
            metrics[key] = torch.stack(saturated).amin(0)
        return PreferenceLossOutput(total, outputs[0].chosen_rewards, outputs[0].rejected_rewards, metrics,
                                    outputs[0].desirable)  # fmt: skip

    def extra_repr(self) -> str:
        return f"weights={self.weights}"


# ------------------------------------------------------------------------------------------ unpaired feedback


class UnpairedLoss(PreferenceLoss):
    """Base of the losses on unpaired rows (``data_kind = "unpaired"``): each row is one (prompt, completion) with
    a label, desirable or undesirable; the batch also carries each row's mismatched KL completion (see
    :class:`SequenceLogProbs`). Subclasses implement :meth:`row_losses`.

    Notation: r_i = pi(y_i|x_i) - ref(y_i|x_i) is row i's log-ratio on summed log-probs, lambda_D / lambda_U the
    desirable / undesirable weights, and z0 the reference point:

        z0 = max(0, mean_j [pi(y'_j|x_j) - ref(y'_j|x_j)])     (detached)

    over the batch's KL completions y'_j (another row's completion after prompt x_j), averaged over the ranks under
    torch.distributed as TRL gathers it (every rank calls the loss equally often: train steps and eval batches
    are equal per rank). Rewards are beta * r_i, logged per class; ``rewards/accuracies`` is the share of rows
    whose r lies on their label's side of :meth:`reference_point`.
    """

    data_kind = "unpaired"
    batch_coupled = True  # z0 and the KL completions come from the micro-batch

    def __init__(self, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> None:
        super().__init__(beta)
        for name, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"{type(self).__name__}: {name} must be finite and > 0, got {weight}")
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight

    def forward(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> PreferenceLossOutput:
        batch_size = _check_logps(policy, "policy")
        _check_data_kind(self, policy)
        if reference is None:
            raise ValueError(f"{type(self).__name__} needs reference log-probs, got reference=None")
        if _check_logps(reference, "reference") != batch_size:
            raise ValueError(f"policy log-probs are for {batch_size} rows, reference log-probs for "
                             f"{reference.chosen_logps.shape[0]}")  # fmt: skip
        ratios = policy.chosen_logps - reference.chosen_logps
        kl_ratios = (policy.rejected_logps - reference.rejected_logps).detach()
        z0 = kl_estimate(kl_ratios)
        desirable = policy.desirable.bool()
        losses = self.row_losses(ratios, desirable, z0)
        weights = torch.where(desirable, self.desirable_weight, self.undesirable_weight).to(losses.dtype)
        side = torch.where(desirable, 1.0, -1.0) * (ratios.detach() - self.reference_point(z0))
        metrics = {"kl": z0.expand(batch_size), "rewards/accuracies": (side > 0).float() + 0.5 * (side == 0).float()}
        return PreferenceLossOutput(weights * losses, (self.beta * ratios).detach(), self.beta * kl_ratios, metrics,
                                    desirable)  # fmt: skip

    def row_losses(self, ratios: Tensor, desirable: Tensor, z0: Tensor) -> Tensor:
        """Per-row losses [B] before the class weights, from the log-ratios r, the labels and z0."""
        raise NotImplementedError

    def reference_point(self, z0: Tensor) -> Tensor | float:
        """The log-ratio that separates the classes in the loss (z0 for KTO): a row is logged as right
        (``rewards/accuracies``) when its r lies on its label's side of it, a tie counting half."""
        return z0

    def class_balance_warning(self, num_desirable: int, num_undesirable: int) -> str | None:
        """TRL's check of Eq. (8) of the KTO paper: the weighted classes should be balanced,
        lambda_D n_D / (lambda_U n_U) in [1, 4/3]. Returns the warning (None when in range), with TRL's bounds."""
        n_d, n_u = max(num_desirable, 1), max(num_undesirable, 1)
        if n_d == n_u:
            return None
        d_low = round(n_u * self.undesirable_weight / n_d, 2)
        d_high = round(n_u * self.undesirable_weight / n_d * 1.33, 2)
        u_low = round(n_d * self.desirable_weight / n_u / 1.33, 2)
        u_high = round(n_d * self.desirable_weight / n_u, 2)
        if d_low <= self.desirable_weight <= d_high or u_low <= self.undesirable_weight <= u_high:
            return None
        return (f"{num_desirable} desirable and {num_undesirable} undesirable rows with desirable_weight="
                f"{self.desirable_weight:g}, undesirable_weight={self.undesirable_weight:g}: the weighted classes are "
                f"unbalanced (KTO paper Eq. 8). Set EITHER loss.desirable_weight in [{d_low}, {d_high}] OR "
                f"loss.undesirable_weight in [{u_low}, {u_high}] (not both)")  # fmt: skip

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, desirable_weight={self.desirable_weight}, "
                f"undesirable_weight={self.undesirable_weight}")  # fmt: skip


def kl_estimate(kl_ratios: Tensor) -> Tensor:
    """KTO's reference point z0: the batch mean of the KL completions' log-ratios (detached), averaged over the
    ranks under torch.distributed (a collective there), clamped at 0. A 0-d tensor, in the input's dtype or float32,
    whichever is wider (bf16 log-ratios are averaged in float32, float64 ones in float64, as TRL does)."""
    z0 = kl_ratios.detach().to(torch.promote_types(kl_ratios.dtype, torch.float32)).mean()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world_size = torch.distributed.get_world_size()
        if world_size > 1:
            z0 = z0.clone()
            torch.distributed.all_reduce(z0)
            z0 = z0 / world_size
    return z0.clamp(min=0)


class KTOLoss(UnpairedLoss):
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 7), on unpaired rows (prompt, completion, label):

        desirable row:    loss = lambda_D * (1 - sigmoid(beta * (r - z0)))
        undesirable row:  loss = lambda_U * (1 - sigmoid(beta * (z0 - r)))

    with r, z0, lambda_D, lambda_U as in :class:`UnpairedLoss`. Equals TRL 1.16's ``KTOTrainer`` (``loss_type=
    "kto"``) per row: the same losses (TRL orders them desirable first), rewards, ``kl`` and gradients
    (tests/components/test_kto.py runs TRL's own code). The paper's beta is 0.1 for large models; ``desirable_weight`` /
    ``undesirable_weight`` correct an imbalance of the classes (:meth:`class_balance_warning`).
    """

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> None:
        super().__init__(beta, desirable_weight, undesirable_weight)

    def row_losses(self, ratios, desirable, z0):
        return 1 - torch.sigmoid(self.beta * torch.where(desirable, ratios - z0, z0 - ratios))


class APOZeroUnpairedLoss(UnpairedLoss):
    """APO-zero on unpaired rows (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7 unpaired; TRL 1.16's
    ``loss_type="apo_zero_unpaired"``): no reference point,

        desirable row:    loss = lambda_D * (1 - sigmoid(beta * r))
        undesirable row:  loss = lambda_U * sigmoid(beta * r)

    for completions believed better (desirable) or worse than the model's own. The KL completions are still
    scored and ``kl`` logged (TRL skips them and logs 0), so a step costs what a KTO step costs.
    """

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> None:
        super().__init__(beta, desirable_weight, undesirable_weight)

    def row_losses(self, ratios, desirable, z0):
        return torch.where(desirable, 1 - torch.sigmoid(self.beta * ratios), torch.sigmoid(self.beta * ratios))

    def reference_point(self, z0):
        return 0.0
