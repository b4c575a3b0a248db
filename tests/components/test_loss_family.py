"""The DPO loss family against an independent scalar computation of each formula (TRL 1.16's, where TRL has the
loss; the paper's otherwise), plus YAML construction and weighted combinations."""

import math
import random

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config

from dpo_components import losses as L
from dpo_components.losses import SequenceLogProbs

B = 6
rng = random.Random(0)
PI_W = [rng.uniform(-40, -5) for _ in range(B)]
PI_L = [rng.uniform(-40, -5) for _ in range(B)]
REF_W = [x + rng.uniform(-3, 3) for x in PI_W]
REF_L = [x + rng.uniform(-3, 3) for x in PI_L]
N_W = [rng.randint(3, 20) for _ in range(B)]
N_L = [rng.randint(3, 20) for _ in range(B)]


def logps(w, rej, nw=N_W, nl=N_L):
    t = lambda x: torch.tensor(x, dtype=torch.float64)
    return SequenceLogProbs(t(w), t(rej), torch.tensor(nw), torch.tensor(nl))


POLICY, REFERENCE = logps(PI_W, PI_L), logps(REF_W, REF_L)
sig = lambda x: 1 / (1 + math.exp(-x))
logsig = lambda x: -math.log1p(math.exp(-x))


def c(i):  # chosen log-ratio, summed
    return PI_W[i] - REF_W[i]


def r(i):  # rejected log-ratio, summed
    return PI_L[i] - REF_L[i]


def smoothed(z, eps):
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def aot_expected(beta, eps, unpaired):
    if unpaired:
        a, b = sorted(c(i) for i in range(B)), sorted(r(i) for i in range(B))
    else:
        a = sorted(PI_W[i] - PI_L[i] for i in range(B))
        b = sorted(REF_W[i] - REF_L[i] for i in range(B))
    return [smoothed(beta * (x - y), eps) for x, y in zip(a, b)]


def orpo_expected(beta):
    out = []
    for i in range(B):
        w, l = PI_W[i] / N_W[i], PI_L[i] / N_L[i]  # noqa: E741
        log_odds = (w - l) - (math.log1p(-math.exp(w)) - math.log1p(-math.exp(l)))
        out.append(-w - beta * logsig(log_odds))
    return out


CASES = {
    "sigmoid_norm": (
        L.SigmoidNormLoss(beta=0.2),
        lambda: [-logsig(0.2 * (c(i) / N_W[i] - r(i) / N_L[i])) for i in range(B)],
    ),
    "exo_pair": (
        L.EXOPairLoss(beta=0.1, label_smoothing=1e-3),
        lambda: [
            sig(0.1 * (c(i) - r(i))) * (logsig(0.1 * (c(i) - r(i))) - math.log(1 - 1e-3))
            + sig(-0.1 * (c(i) - r(i))) * (logsig(-0.1 * (c(i) - r(i))) - math.log(1e-3))
            for i in range(B)
        ],
    ),
    "nca_pair": (
        L.NCAPairLoss(beta=0.1),
        lambda: [-logsig(0.1 * c(i)) - 0.5 * logsig(-0.1 * c(i)) - 0.5 * logsig(-0.1 * r(i)) for i in range(B)],
    ),
    "bco_pair": (L.BCOPairLoss(beta=0.1), lambda: [-logsig(0.1 * c(i)) - logsig(-0.1 * r(i)) for i in range(B)]),
    "sppo_hard": (L.SPPOHardLoss(beta=0.1), lambda: [(c(i) - 5) ** 2 + (r(i) + 5) ** 2 for i in range(B)]),
    "aot": (L.AOTLoss(beta=0.1, label_smoothing=0.05), lambda: aot_expected(0.1, 0.05, unpaired=False)),
    "aot_unpaired": (L.AOTLoss(beta=0.1, unpaired=True), lambda: aot_expected(0.1, 0.0, unpaired=True)),
    "apo_zero": (L.APOZeroLoss(beta=0.1), lambda: [(1 - sig(0.1 * c(i))) + sig(0.1 * r(i)) for i in range(B)]),
    "apo_down": (L.APODownLoss(beta=0.1), lambda: [sig(0.1 * c(i)) + (1 - sig(0.1 * (c(i) - r(i)))) for i in range(B)]),
    "discopop": (
        L.DiscoPOPLoss(beta=0.1, tau=0.05),
        lambda: [
            (1 - sig(0.1 * (c(i) - r(i)) / 0.05)) * -logsig(0.1 * (c(i) - r(i)))
            + sig(0.1 * (c(i) - r(i)) / 0.05) * math.exp(-0.1 * (c(i) - r(i)))
            for i in range(B)
        ],
    ),
    "orpo": (L.ORPOLoss(beta=0.1), lambda: orpo_expected(0.1)),
    "cpo": (
        L.CPOLoss(beta=0.1, alpha=1.0),
        lambda: [-logsig(0.1 * (PI_W[i] - PI_L[i])) - PI_W[i] / N_W[i] for i in range(B)],
    ),
    "dpop": (
        L.DPOPLoss(beta=0.1, dpop_lambda=50.0),
        lambda: [-logsig(0.1 * (c(i) - r(i) - 50.0 * max(0.0, REF_W[i] - PI_W[i]))) for i in range(B)],
    ),
    "rdpo": (
        L.RDPOLoss(beta=0.1, alpha=0.02),
        lambda: [-logsig(0.1 * (c(i) - r(i)) + 0.02 * (N_W[i] - N_L[i])) for i in range(B)],
    ),
    "nll": (L.NLLLoss(), lambda: [-PI_W[i] / N_W[i] for i in range(B)]),
}


@pytest.mark.parametrize("name", CASES)
def test_per_pair_values_match_independent_formula(name):
    loss, expected = CASES[name]
    out = loss(POLICY, REFERENCE if loss.needs_reference else None)
    assert out.losses.tolist() == pytest.approx(expected(), rel=1e-9, abs=1e-12)
    assert out.losses.shape == (B,) and not out.chosen_rewards.requires_grad


@pytest.mark.parametrize("name", CASES)
def test_reference_free_losses_ignore_the_reference(name):
    loss, _ = CASES[name]
    if loss.needs_reference:
        with pytest.raises(ValueError, match="needs reference"):
            loss(POLICY, None)
    else:
        assert loss(POLICY, None).losses.tolist() == loss(POLICY, REFERENCE).losses.tolist()


def test_ipo_logs_its_margin_and_target():
    out = L.IPOLoss(beta=0.25)(POLICY, REFERENCE)
    h = [c(i) / N_W[i] - r(i) / N_L[i] for i in range(B)]
    assert out.metrics["ipo/margin"].tolist() == pytest.approx(h)
    assert out.metrics["ipo/target"].tolist() == [2.0] * B
    assert out.metrics["ipo/abs_gap"].tolist() == pytest.approx([abs(x - 2.0) for x in h])


def test_exo_needs_positive_smoothing():
    with pytest.raises(ValueError, match=r"label_smoothing must be in \(0, 0.5\)"):
        L.EXOPairLoss(label_smoothing=0.0)


def test_aot_is_batch_coupled():
    """Permuting the batch permutes nothing back: the per-position losses are those of sorted margins."""
    loss = L.AOTLoss(beta=0.1)
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    permuted = lambda s: SequenceLogProbs(
        s.chosen_logps[perm], s.rejected_logps[perm], s.chosen_tokens[perm], s.rejected_tokens[perm]
    )
    a, b = loss(POLICY, REFERENCE), loss(permuted(POLICY), permuted(REFERENCE))
    assert a.losses.tolist() == pytest.approx(b.losses.tolist())  # same sorted pairing whatever the order


def test_weighted_sum_from_yaml_equals_the_weighted_terms():
    cfg = OmegaConf.create(
        {
            "_component_": "dpo_components.losses.WeightedSum",
            "terms": [
                {"weight": 1.0, "loss": {"_component_": "dpo_components.losses.DPOLoss", "beta": 0.1}},
                {"weight": 0.2, "loss": {"_component_": "dpo_components.losses.NLLLoss"}},
            ],
        }
    )
    combo = config.instantiate(cfg)
    assert combo.needs_reference
    out = combo(POLICY, REFERENCE)
    dpo = L.DPOLoss(beta=0.1)(POLICY, REFERENCE)
    expected = [dpo.losses[i].item() - 0.2 * PI_W[i] / N_W[i] for i in range(B)]
    assert out.losses.tolist() == pytest.approx(expected)
    assert out.chosen_rewards.tolist() == dpo.chosen_rewards.tolist()
    assert out.metrics["loss/1_NLLLoss"].tolist() == pytest.approx([-PI_W[i] / N_W[i] for i in range(B)])
    # RPO as a combination equals RPO as DPOLoss(nll_weight=...)
    assert out.losses.tolist() == pytest.approx(L.DPOLoss(beta=0.1, nll_weight=0.2)(POLICY, REFERENCE).losses.tolist())


def test_weighted_sum_of_reference_free_terms_needs_no_reference():
    combo = L.WeightedSum([{"loss": L.SimPOLoss()}, {"weight": 0.5, "loss": L.NLLLoss()}])
    assert combo.needs_reference is False
    assert combo(POLICY, None).losses.shape == (B,)


@pytest.mark.parametrize("name", CASES)
def test_every_loss_builds_from_yaml(name):
    loss, _ = CASES[name]
    cfg = OmegaConf.create({"_component_": f"dpo_components.losses.{type(loss).__name__}"})
    assert type(config.instantiate(cfg)) is type(loss)
