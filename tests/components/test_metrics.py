"""dpo_components.metrics: what a step logs, against formulas written out here, for pairs and for KTO's unpaired
rows; the zero-gradient warning; the all-reduce over ranks (one rank here, two in test_distributed.py)."""

import pytest
import torch

from dpo_components.losses import PreferenceLossOutput, SequenceLogProbs
from dpo_components.metrics import PreferenceMetrics, ZeroGradientWatch, all_reduce_metrics


def pair_output(losses, chosen, rejected, ipo=None):
    t = lambda x: torch.tensor(x, dtype=torch.float32)
    metrics = {"ipo/margin": t(ipo)} if ipo is not None else {}
    ones = torch.ones(len(losses))
    return (PreferenceLossOutput(t(losses), t(chosen), t(rejected), metrics),
            SequenceLogProbs(t(chosen) - 10, t(rejected) - 20, ones, ones))  # fmt: skip


def test_pair_metrics_are_means_over_every_pair_of_every_micro_batch():
    metrics = PreferenceMetrics()
    metrics.update(*pair_output([0.2, 0.4], [1.0, 0.0], [0.0, 0.0], ipo=[1.0, 3.0]))
    metrics.update(*pair_output([0.6], [0.5], [2.0], ipo=[5.0]))
    got = metrics.compute()
    assert got["loss"] == pytest.approx(0.4)
    assert got["rewards/chosen"] == pytest.approx(0.5) and got["rewards/rejected"] == pytest.approx(2 / 3)
    assert got["rewards/margins"] == pytest.approx((1.0 + 0.0 - 1.5) / 3)
    assert got["rewards/accuracies"] == pytest.approx((1 + 0.5 + 0) / 3)  # a tie counts half
    assert got["logps/chosen"] == pytest.approx(0.5 - 10) and got["logps/rejected"] == pytest.approx(2 / 3 - 20)
    assert got["ipo/margin"] == pytest.approx(3.0)


def test_unpaired_rows_are_averaged_per_class_and_counted():
    t = lambda x: torch.tensor(x, dtype=torch.float32)
    desirable = torch.tensor([True, False, True])
    out = PreferenceLossOutput(t([0.1, 0.2, 0.3]), t([2.0, -1.0, 4.0]), t([0.0, 0.0, 0.0]),
                               {"kl": t([0.5, 0.5, 0.5]), "rewards/accuracies": t([1.0, 0.0, 1.0])}, desirable)
    policy = SequenceLogProbs(t([-1.0, -2.0, -3.0]), t([0.0, 0.0, 0.0]), t([1, 1, 1]), t([1, 1, 1]), desirable)
    metrics = PreferenceMetrics()
    metrics.update(out, policy)
    got = metrics.compute()
    assert got["rewards/chosen"] == pytest.approx(3.0) and got["rewards/rejected"] == pytest.approx(-1.0)
    assert got["rewards/margins"] == pytest.approx(4.0)
    assert got["logps/chosen"] == pytest.approx(-2.0) and got["logps/rejected"] == pytest.approx(-2.0)
    assert (got["count/desirable"], got["count/undesirable"]) == (2.0, 1.0)


def test_the_zero_gradient_warning_comes_once_after_patience_steps_in_a_row():
    watch = ZeroGradientWatch(object(), patience=3)
    norms = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    warnings = [watch.update(norm, step) for step, norm in enumerate(norms, 1)]
    assert [step for step, w in enumerate(warnings, 1) if w] == [6]
    assert "steps 4-6" in warnings[5]


def test_all_reduce_on_one_rank_equals_the_local_averages(one_rank_group):
    metrics = PreferenceMetrics()
    batch = {"lengths": torch.tensor([3, 5]), "input_ids": torch.zeros(2, 6, dtype=torch.long)}
    metrics.update(*pair_output([0.2, 0.4], [1.0, 0.0], [0.0, 1.0]), batch)
    reduced = all_reduce_metrics(metrics, torch.device("cpu"))
    assert reduced.pop("tokens") == metrics.tokens == 8
    assert reduced == pytest.approx(metrics.compute())
