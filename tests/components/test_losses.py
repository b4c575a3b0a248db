"""Loss values against hand computation (math module, not torch), gradient directions, edge cases."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config

from dpo_components.losses import (
    DPOLoss,
    HingeLoss,
    IPOLoss,
    PreferenceLoss,
    RobustDPOLoss,
    SequenceLogProbs,
    SimPOLoss,
)

# Two pairs. Policy and reference summed log-probs, response lengths.
PI_W, PI_L, REF_W, REF_L = [-10.0, -4.0], [-12.0, -3.0], [-11.0, -5.0], [-11.5, -2.0]
N_W, N_L = [5, 2], [4, 3]


def logps(w, rej, nw=N_W, nl=N_L, grad=False):
    t = lambda x: torch.tensor(x, dtype=torch.float64, requires_grad=grad)
    return SequenceLogProbs(t(w), t(rej), torch.tensor(nw), torch.tensor(nl))


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def h(i, average=False):
    if average:
        return (PI_W[i] - REF_W[i]) / N_W[i] - (PI_L[i] - REF_L[i]) / N_L[i]
    return (PI_W[i] - REF_W[i]) - (PI_L[i] - REF_L[i])


def run(loss, policy=None, reference=None):
    return loss(policy or logps(PI_W, PI_L), reference or logps(REF_W, REF_L))


def test_dpo_matches_hand_computation():
    out = run(DPOLoss(beta=0.1))
    expected = [-log_sigmoid(0.1 * h(i)) for i in range(2)]  # h = [1.5, -2.0]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1 * (PI_W[i] - REF_W[i]) for i in range(2)])
    assert out.rejected_rewards.tolist() == pytest.approx([0.1 * (PI_L[i] - REF_L[i]) for i in range(2)])


def test_conservative_dpo_label_smoothing():
    eps = 0.2
    out = run(DPOLoss(beta=0.5, label_smoothing=eps))
    expected = [-(1 - eps) * log_sigmoid(0.5 * h(i)) - eps * log_sigmoid(-0.5 * h(i)) for i in range(2)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.losses.tolist() != pytest.approx(run(DPOLoss(beta=0.5)).losses.tolist())


def test_robust_dpo():
    eps = 0.1
    out = run(RobustDPOLoss(beta=0.1, label_smoothing=eps))
    z = [0.1 * h(i) for i in range(2)]
    expected = [(-(1 - eps) * log_sigmoid(x) + eps * log_sigmoid(-x)) / (1 - 2 * eps) for x in z]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_ipo_averaged_by_default_and_summed_on_request():
    beta = 0.1
    averaged = run(IPOLoss(beta=beta))
    assert averaged.losses.tolist() == pytest.approx([(h(i, True) - 1 / (2 * beta)) ** 2 for i in range(2)])
    summed = run(IPOLoss(beta=beta, average_logprobs=False))
    assert summed.losses.tolist() == pytest.approx([(h(i) - 1 / (2 * beta)) ** 2 for i in range(2)])


def test_hinge():
    out = run(HingeLoss(beta=1.0))
    assert out.losses.tolist() == pytest.approx([max(0.0, 1 - h(i)) for i in range(2)])  # [0, 3]
    assert out.losses[0].item() == 0.0


def test_simpo_is_reference_free_and_length_normalised():
    beta, gamma = 2.0, 0.5
    loss = SimPOLoss(beta=beta, gamma=gamma)
    assert loss.needs_reference is False
    out = loss(logps(PI_W, PI_L), None)
    z = [beta * PI_W[i] / N_W[i] - beta * PI_L[i] / N_L[i] - gamma for i in range(2)]
    assert out.losses.tolist() == pytest.approx([-log_sigmoid(x) for x in z], rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * PI_W[i] / N_W[i] for i in range(2)])


def test_nll_weight_adds_rpo_term():
    alpha = 0.7
    base, rpo = run(DPOLoss()), run(DPOLoss(nll_weight=alpha))
    nll = [-PI_W[i] / N_W[i] for i in range(2)]
    assert (rpo.losses - base.losses).tolist() == pytest.approx([alpha * x for x in nll])


LOSSES = [
    DPOLoss(),
    DPOLoss(label_smoothing=0.1),
    RobustDPOLoss(),
    IPOLoss(),
    IPOLoss(average_logprobs=False),
    HingeLoss(beta=0.01),
    SimPOLoss(),
    DPOLoss(nll_weight=1.0),
]


@pytest.mark.parametrize("loss", LOSSES, ids=repr)
def test_gradient_raises_chosen_and_lowers_rejected(loss):
    policy = logps(PI_W, PI_L, grad=True)
    out = loss(policy, logps(REF_W, REF_L) if loss.needs_reference else None)
    out.losses.sum().backward()
    # Descent direction (-grad): chosen log-probs go up, rejected go down, for every pair.
    assert (policy.chosen_logps.grad < 0).all()
    assert (policy.rejected_logps.grad >= 0).all()
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("loss", LOSSES, ids=repr)
def test_zero_length_response_raises_not_nan(loss):
    policy = logps(PI_W, PI_L, nw=[5, 0])
    reference = logps(REF_W, REF_L, nw=[5, 0]) if loss.needs_reference else None
    with pytest.raises(ValueError, match=r"chosen responses of pair\(s\) \[1\].*non-positive token counts \[0\]"):
        loss(policy, reference)


def test_reference_loss_without_reference_raises():
    with pytest.raises(ValueError, match="needs reference"):
        DPOLoss()(logps(PI_W, PI_L), None)


@pytest.mark.parametrize(
    "make",
    [
        lambda: DPOLoss(beta=0),
        lambda: DPOLoss(label_smoothing=0.5),
        lambda: RobustDPOLoss(label_smoothing=-1),
        lambda: SimPOLoss(label_smoothing=0.6),
        lambda: IPOLoss(nll_weight=-1),
        lambda: DPOLoss(beta=float("nan")),
        lambda: IPOLoss(beta=float("inf")),
        lambda: SimPOLoss(beta=-2.0),
        lambda: DPOLoss(nll_weight=float("nan")),
    ],
)
def test_bad_hyperparameters_raise(make):
    with pytest.raises(ValueError):
        make()


def test_from_concatenated_splits_chosen_first():
    sums, counts = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([5, 6, 7, 8])
    split = SequenceLogProbs.from_concatenated(sums, counts)
    assert split.chosen_logps.tolist() == [1.0, 2.0] and split.rejected_logps.tolist() == [3.0, 4.0]
    assert split.chosen_tokens.tolist() == [5, 6] and split.rejected_tokens.tolist() == [7, 8]


def test_losses_build_from_yaml():
    cfg = OmegaConf.create({"_component_": "dpo_components.losses.IPOLoss", "beta": 0.25, "average_logprobs": False})
    loss = config.instantiate(cfg)
    assert isinstance(loss, PreferenceLoss) and loss.beta == 0.25 and loss.average_logprobs is False


def test_dpo_equals_torchtune_dpo_loss():
    """An independent implementation: torchtune 0.6.1's own DPOLoss (sigmoid + label smoothing)."""
    from torchtune.rlhf.loss import DPOLoss as TorchtuneDPOLoss

    theirs = TorchtuneDPOLoss(beta=0.3, label_smoothing=0.1)
    t = lambda x: torch.tensor(x, dtype=torch.float64)
    losses, chosen_rewards, rejected_rewards = theirs(t(PI_W), t(PI_L), t(REF_W), t(REF_L))
    ours = run(DPOLoss(beta=0.3, label_smoothing=0.1))
    torch.testing.assert_close(ours.losses, losses)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards)


# ------------------------------------------------------------------------------- bad tensors (issue 12)


@pytest.mark.parametrize(
    "policy,reference,message",
    [
        # [B, 1] against [B] used to broadcast into a [B, B] loss
        (SequenceLogProbs(torch.tensor([[-1.0], [-2.0]]), torch.tensor([-3.0, -4.0]), torch.tensor([1, 1]),
                          torch.tensor([1, 1])), None, r"policy log-probs and token counts must all have one shape"),
        (logps(PI_W, PI_L), logps(REF_W[:1], REF_L[:1], N_W[:1], N_L[:1]), "policy log-probs are for 2 pairs, "
         "reference log-probs for 1"),
        (logps([], [], [], []), None, r"policy log-probs hold no pairs \(B = 0\)"),
        (logps(PI_W, PI_L, nl=[3, -2]), None, r"rejected responses of pair\(s\) \[1\] .* non-positive token "
         r"counts \[-2\]"),
    ],
)  # fmt: skip
def test_bad_shapes_and_counts_raise(policy, reference, message):
    with pytest.raises(ValueError, match=message):
        DPOLoss()(policy, reference or logps(REF_W, REF_L))


def test_minus_inf_rejected_logprob_gives_trl_value_not_nan():
    policy = logps([-1.0], [float("-inf")], [2], [2])
    reference = logps([-1.5], [-2.0], [2], [2])
    assert DPOLoss(beta=0.1)(policy, reference).losses.tolist() == [0.0]  # TRL: -logsigmoid(+inf) = 0
    assert RobustDPOLoss(beta=0.1, label_smoothing=0.0)(policy, reference).losses.tolist() == [0.0]
    assert DPOLoss(beta=0.1, label_smoothing=0.1)(policy, reference).losses.tolist() == [math.inf]  # cDPO: 0.1 L(-inf)


def test_length_normalised_log_ratios_divide_the_difference():
    """(pi - ref) / |y| is exact where pi and ref are close; pi/|y| - ref/|y| loses ~12 digits (old behaviour)."""
    from fractions import Fraction

    from dpo_components.losses import SigmoidNormLoss

    pw, rw, pl, rl, nw, nl = -1000.123456789, -1000.123456788, -2000.5, -2000.5000001, 3, 7
    policy, reference = logps([pw], [pl], [nw], [nl]), logps([rw], [rl], [nw], [nl])
    exact_w, exact_l = (Fraction(pw) - Fraction(rw)) / nw, (Fraction(pl) - Fraction(rl)) / nl
    beta = 0.5
    ipo = IPOLoss(beta=beta)(policy, reference)
    norm = SigmoidNormLoss(beta=beta)(policy, reference)
    assert abs(Fraction(ipo.metrics["ipo/margin"].item()) - (exact_w - exact_l)) < 1e-24
    for out in (ipo, norm):
        assert abs(Fraction(out.chosen_rewards.item()) - beta * exact_w) < 1e-24
        assert abs(Fraction(out.rejected_rewards.item()) - beta * exact_l) < 1e-24
