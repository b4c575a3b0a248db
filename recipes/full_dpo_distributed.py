"""Full-parameter DPO (or any preference loss) on several GPUs or CPU processes with FSDP2, one node or many.

    tune run --nproc_per_node 2 recipes/full_dpo_distributed.py --config recipe_configs/tiny/full_dpo_distributed.yaml
    torchrun --nproc_per_node 8 recipes/full_dpo_distributed.py --config recipe_configs/llama3_1/8B_full_dpo.yaml
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 recipes/... (each node)

PyTorch's own engine: ``torch.distributed`` with NCCL on CUDA and gloo on CPU, the policy sharded with FSDP2
(``fully_shard`` per transformer layer, then the root), launched by torchrun; started without it
(``python recipes/full_dpo_distributed.py --config ...``) it runs as one process.

- The global batch of a micro-step is ``batch_size`` pairs per rank x world size; the ranks take consecutive slices
  of the same seeded order, so 2 ranks x batch 4 train on exactly the pairs 1 process x batch 8 would, and FSDP
  averages the gradients: the step is the same (tested).
- Reference (``reference.mode``): ``model``, a frozen FSDP-sharded copy loaded from ``reference.checkpointer``
  (default: the policy's starting checkpoint), in eval mode with no grads; or ``precomputed``, one no-grad pass
  over the train and eval pairs before training (the ranks split the batches), cached on disk keyed by (tokenized
  data, reference checkpoint, dtype) and reused by later runs; no reference model is kept then.
- Speed switches, as in the single-device recipes: ``group_by_length`` (each global batch holds pairs of similar
  length), ``prefix_sharing`` (one [prompt | chosen | rejected] row per pair, the prompt encoded once) and ``packing``
  (each rank's pairs end to end in a few rows, no padding between them); ``max_micro_batch_tokens`` (each rank's
  step in micro-batches of at most that many computed tokens, as many on every rank).
- Metrics are all-reduced and averaged over ranks and micro-batches; only rank 0 logs and shows progress.
- Checkpoints: ``step_<N>/`` with distributed checkpointing (DCP: sharded model and optimizer, each rank writes its
  shard) plus the LR schedule, data position and every rank's RNG, for an exact resume on the same world size;
  at the end (and every save with ``consolidate_every_save: true``) also the consolidated Hugging Face
  safetensors + config.json, written by rank 0. Each ``step_<N>`` is written under a temporary name and renamed.
- ``eval_samples: N``: each rank samples a share of the held-out prompts with the sharded models at every eval.
- An error on one rank is printed and ends that rank at once (no barrier after a failure); torchrun stops the rest
  (``dpo_components.distributed.process_group``).

The code is ``recipes/ipo_single_device.py`` plus sharding (``diff`` the two files).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torchtune import config, training, utils

from dpo_components.checkpointing import (
    check_same_run,
    checkpoint_fingerprint,
    full_model_files,
    load_sharded_checkpoint,
    prepare_output_dir,
    run_fingerprint,
    save_failed,
    save_sharded_checkpoint,
)
from dpo_components.data.order import batch_order
from dpo_components.data.recipe_data import load_recipe_data
from dpo_components.distributed import agree_micro_batches, from_rank_zero, process_group, rank_slice
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.models.builders import sharded_model
from dpo_components.precision import MasterWeights
from dpo_components.reference import build_reference
from dpo_components.run import (
    RunProgress,
    StepLog,
    clip_gradients,
    close_metric_logger,
    due,
    evaluate,
    start_metric_logger,
)
from dpo_components.samples import eval_sampling
from dpo_components.settings import RecipeSettings, instantiate_loss, prepare_and_check_inputs

log = utils.get_logger("INFO")


class FullDPORecipeDistributed:
    def __init__(self, cfg: DictConfig) -> None:
        self.settings = RecipeSettings.from_config(cfg)  # every shared key, its default and its check
        self._world_size, self._is_rank_zero = dist.get_world_size(), dist.get_rank() == 0
        self.seed = training.set_seed(self.settings.seed)  # the global seed; torch is seeded with seed + rank
        prepare_and_check_inputs(cfg)  # the tiny configs build their model and data on first use (file-locked)
        self.progress = RunProgress()  # steps taken, position in the data, last checkpoint (dpo_components.run)

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        s = self.settings
        self._loss_fn = instantiate_loss(cfg.loss, s)  # first: a loss the settings refuse stops here
        # rank 0: no mixing with an earlier run, leftovers of killed saves removed, the newest complete checkpoint
        resume_dir = from_rank_zero(prepare_output_dir, s.output_dir, s.resume, s.overwrite_output_dir)
        self._metric_logger = start_metric_logger(cfg.metric_logger, cfg)  # None on ranks > 0
        self._checkpointer = config.instantiate(cfg.checkpointer, resume_from_checkpoint=False)
        base_state = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
        self._model = sharded_model(cfg.model, s, base_state, trainable=True)  # fp32 master shards, see there
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._data = load_recipe_data(cfg, s, self._tokenizer, self._model.max_seq_len, self._world_size,
                                      loss=self._loss_fn)  # fmt: skip
        # what this run is trained with (config keys, data and checkpoint hashes): a resume must match it
        self._fingerprint = from_rank_zero(run_fingerprint, cfg, self._data.train, seed=self.seed,
                                           world_size=self._world_size)  # fmt: skip
        if resume_dir is not None:  # checked before the long parts of setup (reference log-probs)
            check_same_run(resume_dir, checkpoint_fingerprint(resume_dir), self._fingerprint)
        # eval_samples: responses of policy and reference to held-out prompts, sampled at every eval
        self._sampling = eval_sampling(cfg, self._data.eval, self._tokenizer, self.seed)
        # The reference: a frozen sharded copy of the start or of reference.checkpointer; or precomputed. A resume
        # loads the policy's shards afterwards.
        self._reference = build_reference(
            s, self._loss_fn, self._model, has_adapters=False,
            frozen_copy=partial(self._frozen_copy, cfg.model, base_state), datasets=self._data.splits(),
            collate_fn=self._data.collate, fingerprint=self._fingerprint, tokenizer=self._tokenizer,
        )  # fmt: skip
        del base_state

        self._steps_per_epoch = s.steps_per_epoch(len(self._data.train), self._world_size)
        self._total_steps = self._steps_per_epoch * s.epochs
        # the sharded parameters are the master weights (fp32 with dtype bf16, see sharded_model): stepped in place
        self._master = MasterWeights(self._model.named_parameters(), s.master_dtype, seed=self.seed + dist.get_rank())
        self._optimizer = config.instantiate(cfg.optimizer, self._master.params)
        self._lr_scheduler = config.instantiate(cfg.lr_scheduler, self._optimizer, num_training_steps=self._total_steps)
        if self._is_rank_zero:
            self._master.check_optimizer(self._optimizer)  # refuses what cannot step them; warns on lost updates
        if resume_dir is not None:
            self._load_recipe_state(resume_dir)
        if self._is_rank_zero:
            log.info(
                f"{self._world_size} ranks ({dist.get_backend()}), global batch {s.batch_size * self._world_size} x "
                f"{s.gradient_accumulation_steps} micro-batches, full-parameter training of {len(self._master):,} "
                f"parameters ({self._master.describe()}); {len(self._data.train)} pairs, {self._steps_per_epoch} "
                f"steps/epoch x {s.epochs} epochs; loss {self._loss_fn}; reference {self._reference.describe()}"
            )

    def _frozen_copy(self, cfg_model: DictConfig, start: dict[str, Any], ckpt: DictConfig | None) -> torch.nn.Module:
        """A sharded reference in eval mode without grads: the starting weights, or ``reference.checkpointer``'s."""
        if ckpt is not None:
            start = config.instantiate(ckpt, resume_from_checkpoint=False).load_checkpoint()[training.MODEL_KEY]
        return sharded_model(cfg_model, self.settings, start, trainable=False)

    # -------------------------------------------------------------------------------------------- the step

    def _forward(self, batch: dict[str, torch.Tensor], split: str):
        """Policy log-probs (with grad), reference log-probs (cached, or the reference model's; no grad), the loss."""
        batch = {k: v.to(self.settings.device) for k, v in batch.items()}
        policy = concatenated_logprobs(self._model, batch, self.settings.logprob_chunk_size,
                                       self.settings.flex_attention)  # fmt: skip
        return self._loss_fn(policy, self._reference.logprobs(batch, split)), policy

    def train(self) -> None:
        s, progress = self.settings, self.progress
        step_log = StepLog(s, self._metric_logger, self._loss_fn, self._total_steps, progress.global_step)
        for epoch in range(progress.epochs_run, s.epochs):
            # the same order on every rank, each rank its slice of every global batch (batch_size x world size)
            order = rank_slice(batch_order(self._data.train, self.seed, epoch, s.batch_size * self._world_size,
                                           s.shuffle, s.group_by_length, s.prefix_sharing), s.batch_size)  # fmt: skip
            # one step's pairs at a time, split into micro-batches below
            loader = DataLoader(self._data.train, batch_size=s.batch_size * s.gradient_accumulation_steps,
                                collate_fn=list, sampler=order[progress.batches_done_in_epoch * s.batch_size :],
                                drop_last=True, generator=torch.Generator())  # not the global RNG (dropout masks)
            self._model.train()
            for samples in loader:
                if progress.batches_done_in_epoch // s.gradient_accumulation_steps >= self._steps_per_epoch:
                    break
                # gradient_accumulation_steps micro-batches of batch_size pairs, or by max_micro_batch_tokens, as
                # many on every rank (each is a forward and backward through the sharded model)
                for members in agree_micro_batches(self._data.micro_batches(samples), s.device):
                    batch = self._data.collate([samples[i] for i in members])
                    out, policy = self._forward(batch, "train")
                    # weighted by its share of the step's pairs: the step's loss is the mean over all of them
                    (out.losses.mean() / (len(samples) / len(members))).backward()
                    self._master.accumulate_grads()  # into the fp32 master gradients (no-op without master copies)
                    step_log.update(out, policy, batch)
                progress.batches_done_in_epoch += s.gradient_accumulation_steps

                grad_norm = clip_gradients(self._master.params, s.clip_grad_norm)
                logged = step_log.step_metrics()  # averaged over the ranks
                progress.stop_if_nonfinite(logged["loss"], grad_norm)  # before the optimizer step
                lr = self._optimizer.param_groups[0]["lr"]  # the rate this step uses (logged with it)
                # optimizer.step() on the master weights, then into the model; on logging steps also the share of
                # sampled weights the step left unchanged (bf16 rounding eating updates shows here)
                unchanged = self._master.step(self._optimizer, measure=due(progress.global_step + 1,
                                                                           s.log_every_n_steps))  # fmt: skip
                self._optimizer.zero_grad(set_to_none=True)
                self._lr_scheduler.step()
                progress.global_step += 1

                step_log.write(progress.global_step, logged, lr=lr, grad_norm=grad_norm,
                               unchanged_weight_share=unchanged)  # fmt: skip
                if due(progress.global_step, s.eval_every_n_steps):
                    self.evaluate()
                if due(progress.global_step, s.save_every_n_steps):  # the last one with the consolidated HF model
                    last = progress.global_step == self._total_steps
                    self.save_checkpoint(consolidate=s.consolidate_every_save or last)
            progress.next_epoch(epoch)
        step_log.close()
        if progress.needs_final_eval(self._data.eval is not None):
            self.evaluate()
        if progress.needs_final_save():
            self.save_checkpoint(consolidate=True)

    def evaluate(self) -> dict[str, float]:
        """Loss, accuracy, margins and the loss's own metrics (IPO's margin vs target) on the held-out pairs, and
        with ``eval_samples`` responses of policy and reference: logged as eval/*."""
        self.progress.last_eval_step = self.progress.global_step
        return evaluate(self._model, partial(self._forward, split="eval"), self._data.eval, self._data.collate,
                        self.settings.batch_size, self.settings.device, step=self.progress.global_step,
                        metric_logger=self._metric_logger, sampling=self._sampling,
                        reference=self._reference.sampling_context)  # fmt: skip

    # ------------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, consolidate: bool = False) -> Path:
        """``step_<N>/``: DCP shards of model + optimizer, LR schedule, progress, per-rank RNG; with ``consolidate``
        also the full model in HF safetensors, gathered and written by rank 0 (``checkpointing.sharded``)."""
        state = {**self.progress.counters(), "lr_scheduler": self._lr_scheduler.state_dict(), "run": self._fingerprint}
        path = self.settings.output_dir / f"step_{self.progress.global_step}"
        consolidated = full_model_files(self._model, self.settings.device) if consolidate else None
        try:
            save_sharded_checkpoint(path, self._model, self._optimizer, state, checkpointer=self._checkpointer,
                                    hf_files=consolidated, hf_dtype=self.settings.dtype)  # fmt: skip
        except Exception as error:  # disk full, read-only, ...: one message naming the path and the last good one
            raise save_failed(path, error, self.progress.last_checkpoint) from None
        self.progress.saved(path, " (with consolidated HF weights)" if consolidate else "")
        return path

    def _load_recipe_state(self, checkpoint_dir: Path) -> None:
        counters = load_sharded_checkpoint(checkpoint_dir, self._model, self._optimizer, self._lr_scheduler,
                                           self._fingerprint)  # fmt: skip
        self.progress.resume(counters, checkpoint_dir)

    def cleanup(self) -> None:
        close_metric_logger(self._metric_logger, self.settings.output_dir)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    with process_group(cfg.device, cfg.get("collective_timeout_seconds", 1800)):  # NCCL on CUDA, gloo on CPU
        if dist.get_rank() == 0:
            config.log_config(recipe_name="FullDPORecipeDistributed", cfg=cfg)
        recipe = FullDPORecipeDistributed(cfg)
        recipe.setup(cfg)
        recipe.train()
        recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
