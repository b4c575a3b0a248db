"""dpo_components.run: what surrounds every recipe's loop (progress record, step log and cadence, the non-finite stop,
the held-out evaluation), tested without a recipe, on stand-in losses and a stand-in metric logger."""

import math
from pathlib import Path

import pytest
import torch

from dpo_components.losses import PreferenceLossOutput, SequenceLogProbs
from dpo_components.metrics import PreferenceMetrics
from dpo_components.run import RunProgress, StepLog, clip_gradients, due, eval_batch_starts, evaluate
from dpo_components.settings import RecipeSettings


class ListLogger:  # torchtune's metric logger interface, keeping what it is given
    def __init__(self):
        self.logged = []

    def log_dict(self, values, step):
        self.logged.append((step, dict(values)))


def settings(**overrides):
    values = dict(device=torch.device("cpu"), dtype=torch.float32, output_dir=Path("unused"), seed=0, batch_size=2,
                  gradient_accumulation_steps=1, epochs=1, log_every_n_steps=2)  # fmt: skip
    return RecipeSettings(**{**values, **overrides})


def loss_output(losses, chosen, rejected):
    losses, chosen, rejected = (torch.tensor(x, dtype=torch.float32) for x in (losses, chosen, rejected))
    ones = torch.ones_like(chosen)
    return PreferenceLossOutput(losses, chosen, rejected), SequenceLogProbs(chosen * 2, rejected * 2, ones, ones)


def batch_of(lengths):
    return {"lengths": torch.tensor(lengths), "input_ids": torch.zeros(len(lengths), max(lengths), dtype=torch.long)}


def test_every_n_steps_and_never():
    assert [s for s in range(1, 10) if due(s, 3)] == [3, 6, 9]
    assert not any(due(s, None) or due(s, 0) for s in range(1, 10))


def test_the_progress_record_goes_through_a_checkpoint_and_back(tmp_path):
    progress = RunProgress(global_step=7, epochs_run=1, batches_done_in_epoch=6)
    counters = progress.counters()
    assert counters == {"global_step": 7, "epochs_run": 1, "batches_done_in_epoch": 6}
    resumed = RunProgress()
    resumed.resume(counters, tmp_path / "step_7")
    assert resumed.counters() == counters and resumed.last_checkpoint == tmp_path / "step_7"
    resumed.next_epoch(1)
    assert (resumed.epochs_run, resumed.batches_done_in_epoch) == (2, 0)


def test_the_end_of_a_run_evaluates_and_saves_only_what_the_last_step_did_not(tmp_path):
    progress = RunProgress(global_step=4)
    assert progress.needs_final_eval(True) and not progress.needs_final_eval(False) and progress.needs_final_save()
    progress.last_eval_step = 4
    progress.saved(tmp_path / "step_4")
    assert not progress.needs_final_eval(True) and not progress.needs_final_save()
    progress.global_step = 5
    assert progress.needs_final_eval(True) and progress.needs_final_save()


@pytest.mark.parametrize("loss, grad_norm, what", [(math.nan, 1.0, "the loss is nan"),
                                                   (0.5, math.inf, "the gradient norm is inf")])  # fmt: skip
def test_a_nonfinite_step_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path, loss, grad_norm, what):
    progress = RunProgress(global_step=2, where=lambda: " (round 1)")
    progress.stop_if_nonfinite(0.7, 3.0)  # finite: nothing happens
    with pytest.raises(FloatingPointError, match=f"{what} at step 3 \\(round 1\\).*Last good checkpoint: none"):
        progress.stop_if_nonfinite(loss, grad_norm)
    progress.saved(tmp_path / "step_2")
    with pytest.raises(FloatingPointError, match="Last good checkpoint: .*step_2"):
        progress.stop_if_nonfinite(loss, grad_norm)


def test_clip_gradients_returns_the_norm_before_clipping_and_clips_to_the_limit():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0])
    assert clip_gradients([a, b], max_norm=1.0) == pytest.approx(5.0)
    assert torch.cat([a.grad, b.grad]).norm().item() == pytest.approx(1.0, rel=1e-5)
    assert clip_gradients([a, b], max_norm=None) == pytest.approx(1.0, rel=1e-5)  # None: measured, not clipped


def test_the_step_log_writes_every_n_steps_the_averages_of_the_interval():
    logger = ListLogger()
    step_log = StepLog(settings(log_every_n_steps=2), logger, loss=object(), total_steps=4, initial_step=0)
    expected = PreferenceMetrics()
    for step, (losses, chosen, rejected, lengths) in enumerate([([0.5, 0.7], [1.0, 0.0], [0.0, 1.0], [3, 5]),
                                                                ([0.1, 0.3], [2.0, 2.0], [1.0, 3.0], [4, 4])], 1):
        out, policy = loss_output(losses, chosen, rejected)
        step_log.update(out, policy, batch_of(lengths))
        expected.update(out, policy, batch_of(lengths))
        logged = step_log.step_metrics()
        step_log.write(step, logged, lr=0.1 * step, grad_norm=1.0, unchanged_weight_share=None)
    step_log.close()
    assert [step for step, _ in logger.logged] == [2]  # step 1 is not a logging step
    values = logger.logged[0][1]
    assert values["loss"] == pytest.approx((0.5 + 0.7 + 0.1 + 0.3) / 4)
    assert values["rewards/accuracies"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert {k: values[k] for k in expected.compute()} == pytest.approx(expected.compute())
    assert values["lr"] == pytest.approx(0.2) and values["tokens_per_second"] > 0 and "tokens" not in values
    assert step_log.metrics.sums == {}  # a new interval after the log line


def test_eval_batches_without_torch_distributed_are_every_batch_in_order():
    assert eval_batch_starts(10, 4) == [(0, True), (4, True), (8, True)]


def test_evaluate_averages_over_every_held_out_pair_and_logs_eval_metrics():
    data = [{"margin": m} for m in (1.0, -1.0, 2.0, 0.5, -0.5)]
    seen = []

    def forward(batch):
        seen.append(len(batch))
        margins = [row["margin"] for row in batch]
        return loss_output([-m for m in margins], margins, [0.0] * len(margins))

    model, logger = torch.nn.Linear(1, 1), ListLogger()
    results = evaluate(model, forward, data, list, 2, torch.device("cpu"), step=3, metric_logger=logger)
    assert seen == [2, 2, 1] and model.training  # the model's mode is restored
    assert results["eval/rewards/accuracies"] == pytest.approx(3 / 5)
    assert results["eval/loss"] == pytest.approx(-2.0 / 5)
    assert logger.logged == [(3, results)]
    assert evaluate(model, forward, None, list, 2, torch.device("cpu"), step=3, metric_logger=None) == {}
