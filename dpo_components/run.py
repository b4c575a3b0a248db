"""What surrounds every recipe's loop, once: where the run is, what a step logs and when, the non-finite stop, the
held-out evaluation and the end of the run.

The loop itself (forward, backward, clipping, the optimizer, master-weight and scheduler steps) stays in each recipe,
where a reader copies and edits it. A recipe's step reads, with these pieces:

    for members in micro_batches:                     # the step's pairs
        ... forward, (loss / share).backward() ...
        step_log.update(out, policy, batch)
    grad_norm = clip_gradients(params, max_norm)
    logged = step_log.step_metrics()                  # all-reduced over ranks under torch.distributed
    progress.stop_if_nonfinite(logged["loss"], grad_norm)
    ... optimizer step ...
    progress.global_step += 1
    step_log.write(progress.global_step, logged, lr=lr, grad_norm=grad_norm, unchanged_weight_share=unchanged)
    if due(progress.global_step, settings.eval_every_n_steps): self.evaluate()
    if due(progress.global_step, settings.save_every_n_steps): self.save_checkpoint()

Under torch.distributed (the FSDP2 recipes) every function here that says "collective" must be called by all
ranks in the same order; only rank 0 logs.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torchtune import config
from torchtune.utils import get_logger
from tqdm import tqdm

from dpo_components.files import writing
from dpo_components.losses import PreferenceLossOutput, SequenceLogProbs
from dpo_components.metrics import (
    DisplacementWatch,
    PreferenceMetrics,
    ZeroGradientWatch,
    all_reduce_metrics,
    peak_memory_gib,
)
from dpo_components.samples import EvalSampling, ReferenceContext, log_samples, sample_and_score

log = get_logger("INFO")
PROGRESS_KEYS = ("global_step", "epochs_run", "batches_done_in_epoch")  # what a checkpoint's recipe state holds
# the eval metrics the log line shows, where the loss has them
EVAL_SUMMARY = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/ipo/margin", "eval/ipo/target")


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_rank_zero() -> bool:
    return not distributed() or dist.get_rank() == 0


def start_metric_logger(cfg_metric_logger: Any, cfg: Any) -> Any:
    """The run's metric logger (torchtune's: disk, TensorBoard, W&B) with the config logged, on rank 0; None on
    the other ranks, which log nothing."""
    if not is_rank_zero():
        return None
    metric_logger = LoggedWrites(config.instantiate(cfg_metric_logger))
    metric_logger.log_config(cfg)
    return metric_logger


class LoggedWrites:
    """A torchtune metric logger whose writes fail with the cause and the file (``dpo_components.files.writing``):
    a disk that fills up while a run logs says ENOSPC and names the log, not a bare ``OSError``. ``logger`` is
    the wrapped one; every other attribute is its."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.where = getattr(logger, "_file_name", None) or getattr(logger, "log_dir", None) or type(logger).__name__

    def __getattr__(self, name: str) -> Any:
        return getattr(self.logger, name)

    def log(self, name: str, data: Any, step: int) -> None:
        with writing(self.where, "the metric log"):
            self.logger.log(name, data, step)

    def log_dict(self, payload: Any, step: int) -> None:
        with writing(self.where, "the metric log"):
            self.logger.log_dict(payload, step)

    def log_config(self, cfg: Any) -> None:
        with writing(self.where, "the metric log"):
            self.logger.log_config(cfg)

    def close(self) -> None:
        with writing(self.where, "the metric log"):
            self.logger.close()


def close_metric_logger(metric_logger: Any, output_dir: Path) -> None:
    if metric_logger is not None:
        metric_logger.close()
        log.info(f"plot this run: python -m dpo_components.tools.plot {output_dir}")


def due(step: int, every: int | None) -> bool:
    """Whether an every-N-steps event (log, eval, save) falls on optimizer step ``step``; ``every`` None or 0: never."""
    return bool(every) and step % every == 0


@dataclass
class RunProgress:
    """Where a run is: the optimizer steps taken, the epochs (the online recipe: rounds) done and, of the current
    one, the micro-batches done in ``batch_size`` units (steps x gradient_accumulation_steps), which is where a resume
    restarts the data order. ``counters()`` go into every checkpoint's recipe state; :meth:`resume` reads them back.
    It also remembers the last checkpoint written (named when a run stops) and the step of the last eval."""

    global_step: int = 0
    epochs_run: int = 0
    batches_done_in_epoch: int = 0
    last_checkpoint: Path | None = None
    last_eval_step: int | None = None
    where: Callable[[], str] = field(default=lambda: "", repr=False)  # e.g. " (round 2)", for the messages

    def counters(self) -> dict[str, int]:
        return {key: getattr(self, key) for key in PROGRESS_KEYS}

    def resume(self, counters: dict[str, int], checkpoint_dir: Path) -> None:
        for key in PROGRESS_KEYS:
            setattr(self, key, counters[key])
        self.last_checkpoint = checkpoint_dir
        if is_rank_zero():
            log.info(f"resumed from {checkpoint_dir} at step {self.global_step}{self.where()}")

    def next_epoch(self, epoch: int) -> None:
        self.epochs_run, self.batches_done_in_epoch = epoch + 1, 0

    def stop_if_nonfinite(self, loss: float, grad_norm: float) -> None:
        """Stop before the optimizer step when the step's loss or gradient norm is NaN/inf, naming the last good
        checkpoint. Every rank sees the same (all-reduced) values, so every rank stops."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
        raise FloatingPointError(
            f"{what} at step {self.global_step + 1}{self.where()}; stopping before the optimizer step. Last good "
            f"checkpoint: {self.last_checkpoint or 'none saved yet'}. Lower the learning rate, use fp32 or set "
            "clip_grad_norm."
        )

    def saved(self, path: Path, what: str = "") -> None:
        self.last_checkpoint = path
        if is_rank_zero():
            log.info(f"saved checkpoint {path}{what}")

    def needs_final_eval(self, has_eval_data: bool) -> bool:
        """At the end of training: an eval unless the last step already had one."""
        return has_eval_data and self.last_eval_step != self.global_step

    def needs_final_save(self) -> bool:
        """At the end of training: a checkpoint unless the last step already wrote one."""
        return self.last_checkpoint is None or self.last_checkpoint.name != f"step_{self.global_step}"


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float | None) -> float:
    """Clip the gradients of ``params`` to ``max_norm`` (None: measure only) and return their total norm (a
    collective for sharded parameters: the norm of the whole model)."""
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm=float(max_norm or math.inf))
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.item()


class StepLog:
    """The metrics of the optimizer steps since the last log line, the progress bar, and the warning when the
    gradient stays exactly 0.

    ``update`` adds a micro-batch; ``step_metrics`` gives the interval's averages after a step (all-reduced over
    ranks under torch.distributed: a collective, each step); ``write`` logs them every ``log_every_n_steps`` with
    the step's learning rate, gradient norm, tokens/s and peak memory, and starts a new interval."""

    def __init__(self, settings: Any, metric_logger: Any, loss: object, total_steps: int, initial_step: int,
                 name: str = "") -> None:  # fmt: skip
        self.settings, self.metric_logger = settings, metric_logger
        self.metrics, self.interval_start = PreferenceMetrics(), time.perf_counter()
        self.zero_gradients = ZeroGradientWatch(loss)  # warns when the loss saturates (KTO at 1:4)
        self.displacement = DisplacementWatch()  # warns when the chosen log-probs keep falling as the margin grows
        loss_name = name + type(loss).__name__.removesuffix("Loss")  # the progress bar: "DPO", "KTO", ...
        self.progress_bar = tqdm(total=total_steps, initial=initial_step, desc=loss_name, dynamic_ncols=True,
                                 disable=not is_rank_zero())  # fmt: skip

    def update(self, out: PreferenceLossOutput, policy: SequenceLogProbs, batch: dict[str, torch.Tensor]) -> None:
        self.metrics.update(out, policy, batch)

    def step_metrics(self) -> dict[str, float]:
        """The interval's averages so far (collective under torch.distributed): ``loss`` is finite as long as
        every step's loss was."""
        if distributed():
            return all_reduce_metrics(self.metrics, self.settings.device)
        return {**self.metrics.compute(), "tokens": self.metrics.tokens}

    def write(self, step: int, logged: dict[str, float], **values: float | None) -> None:
        """After optimizer step ``step``: the progress bar, the zero-gradient watch and, on logging steps, the line."""
        self.progress_bar.update(1)
        if is_rank_zero():
            self.zero_gradients.update(values["grad_norm"], step)
        if not due(step, self.settings.log_every_n_steps):
            return
        logged = dict(logged)
        tokens = logged.pop("tokens")
        logged.update(values, tokens_per_second=tokens / (time.perf_counter() - self.interval_start),
                      peak_memory_gib=peak_memory_gib(self.settings.device))  # fmt: skip
        if self.metric_logger is not None:
            self.metric_logger.log_dict(logged, step=step)
        if is_rank_zero():
            self.displacement.update(step, logged)
        self.progress_bar.set_postfix(loss=f"{logged['loss']:.4f}", acc=f"{logged['rewards/accuracies']:.2f}")
        self.metrics, self.interval_start = PreferenceMetrics(), time.perf_counter()

    def close(self) -> None:
        self.progress_bar.close()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, then back to the mode it was in; no gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    forward: Callable[[dict[str, torch.Tensor]], tuple[PreferenceLossOutput, SequenceLogProbs]],
    data: Any,
    collate: Callable,
    batch_size: int,
    device: torch.device,
    *,
    step: int,
    metric_logger: Any,
    sampling: EvalSampling | None = None,
    reference: ReferenceContext | None = None,
) -> dict[str, float]:
    """Loss, preference accuracy and margins of ``forward`` (policy vs reference) on the held-out pairs ``data``
    (None: none), and with ``sampling`` responses of the policy and the ``reference`` (text, true reward, KL);
    logged as ``eval/*`` at ``step`` and returned (collective under torch.distributed: each rank takes every W-th
    batch, a rank short of batches repeats its last one uncounted, and the results are all-reduced)."""
    results: dict[str, float] = {}
    rows: list[dict[str, str]] = []
    with eval_mode(model):
        if data is not None:
            metrics = PreferenceMetrics()
            for start, counted in eval_batch_starts(len(data), batch_size):
                batch = collate([data[j] for j in range(start, min(start + batch_size, len(data)))])
                out, policy = forward(batch)  # every rank runs the same number of forwards
                if counted:
                    metrics.update(out, policy)
            reduced = all_reduce_metrics(metrics, device) if distributed() else metrics.compute()
            results = {f"eval/{k}": v for k, v in reduced.items() if k != "tokens"}
        if sampling is not None:  # under torch.distributed each rank samples a share of the prompts
            sampled, rows = sample_and_score(model, reference, sampling.prompts, sampling.tokenizer, sampling.settings,
                                             sampling.seed)  # fmt: skip
            results.update(sampled)
    if metric_logger is not None:
        log_samples(metric_logger, rows, step)
        metric_logger.log_dict(results, step=step)
    summary = ", ".join(f"{key.removeprefix('eval/')} {results[key]:.4f}" for key in EVAL_SUMMARY if key in results)
    if is_rank_zero() and summary:
        log.info(f"step {step} eval: {summary}")
    return results


def eval_batch_starts(num_items: int, batch_size: int) -> list[tuple[int, bool]]:
    """(start, counted) of this rank's eval batches: rank r takes batches r, r + W, ... Every rank gets the same
    number of entries, as FSDP's forwards need; a rank short of batches repeats its last one with counted False.
    Without torch.distributed: every batch, in order."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    starts = list(range(0, num_items, batch_size))
    mine = starts[rank::world]
    rounds = -(-len(starts) // world)
    return [(mine[min(i, len(mine) - 1)] if mine else 0, i < len(mine)) for i in range(rounds)]
