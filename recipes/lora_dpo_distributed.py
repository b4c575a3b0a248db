"""LoRA / QLoRA / DoRA DPO (or any preference loss) on several GPUs or CPU processes with FSDP2, one node or many.

    tune run --nproc_per_node 2 recipes/lora_dpo_distributed.py --config recipe_configs/tiny/lora_dpo_distributed.yaml
    CONFIG=recipe_configs/llama3_1/8B_lora_dpo_distributed.yaml
    torchrun --nproc_per_node 8 recipes/lora_dpo_distributed.py --config $CONFIG

The policy is the base model plus LoRA adapters, sharded with FSDP2 (``fully_shard`` per transformer layer, then
the root); only the adapters train. NCCL on CUDA, gloo on CPU, launched by torchrun (``tune run --nproc_per_node``).

- Reference (``reference.mode``): ``model``, the same sharded base model with the adapters disabled (no second copy
  of the weights); or ``precomputed``, one no-grad pass over the train and eval pairs before training (the ranks
  split the batches), cached on disk keyed by (tokenized data, base checkpoint, dtype, QLoRA) and reused by later
  runs. Reference-free losses (SimPO, ...) skip it.
- The adapters start from weights every rank computes alike for any world size
  (``dpo_components.distributed.initial_adapter_state``), so 2 ranks x batch 4 take exactly the step 1 process x
  batch 8 takes (tested). The ranks take consecutive slices of the same seeded order of each global batch
  (``batch_size`` per rank x world size) and FSDP averages the gradients.
- ``quantize_base: true`` (QLoRA): the frozen base is NF4, sharded; ``use_dora: true``: DoRA.
- Speed switches, as in the single-device recipe: ``group_by_length``, ``prefix_sharing``, ``packing``,
  ``max_micro_batch_tokens`` (as many micro-batches on every rank), ``logprob_chunk_size``,
  ``enable_activation_checkpointing``, ``compile``; gradient accumulation.
- Metrics are all-reduced and averaged over ranks and micro-batches; only rank 0 logs and shows progress.
- Checkpoints, ``step_<N>/``: the PEFT adapter (``adapter_model.safetensors`` + ``adapter_config.json``, gathered by
  rank 0), distributed-checkpoint shards of the adapters and their optimizer state (``dcp/``, the frozen base is not
  saved again), the LR schedule, data position and every rank's RNG, for an exact resume on the same world size. At
  the end (and at every save with ``consolidate_every_save: true``) also the merged model (base, dequantized for
  QLoRA, + LoRA) in Hugging Face layout, gathered and written by rank 0: it needs the full model in rank 0's CPU
  memory. Each ``step_<N>`` is written under a temporary name, manifest last, and renamed.
- An error on one rank is printed and ends that rank at once (no barrier after a failure); torchrun stops the rest
  (``dpo_components.distributed.process_group``).

The code is ``recipes/lora_dpo_single_device.py`` plus sharding (``diff`` the two files).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torchtune import config, training, utils

from dpo_components.checkpointing import (
    check_same_run,
    checkpoint_fingerprint,
    load_sharded_checkpoint,
    lora_model_files,
    lora_settings,
    prepare_output_dir,
    run_fingerprint,
    save_failed,
    save_sharded_checkpoint,
)
from dpo_components.data.order import batch_order
from dpo_components.data.recipe_data import load_recipe_data
from dpo_components.distributed import agree_micro_batches, from_rank_zero, process_group, rank_slice
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.models.builders import sharded_lora_model
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


class LoRADPORecipeDistributed:
    def __init__(self, cfg: DictConfig) -> None:
        # every shared key, its default and its check: dpo_components.settings (the reference is adapters off)
        self.settings = RecipeSettings.from_config(cfg, reference_checkpointer=False)
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
        # Our resume reads our own checkpoints (the adapters' shards, after sharding); torchtune's loads the base.
        self._checkpointer = config.instantiate(cfg.checkpointer, resume_from_checkpoint=False)
        base_state = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
        self._model = sharded_lora_model(cfg.model, s, base_state, self.seed)
        self._lora = lora_settings(cfg.model)
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._data = load_recipe_data(cfg, s, self._tokenizer, self._model.max_seq_len, self._world_size,
                                      loss=self._loss_fn)  # fmt: skip
        # what this run is trained with (config keys, data and base checkpoint hashes): a resume must match it
        self._fingerprint = from_rank_zero(run_fingerprint, cfg, self._data.train, seed=self.seed,
                                           world_size=self._world_size)  # fmt: skip
        if resume_dir is not None:  # checked before the long parts of setup (reference log-probs)
            check_same_run(resume_dir, checkpoint_fingerprint(resume_dir), self._fingerprint)
        # eval_samples: responses of policy and reference to held-out prompts, sampled at every eval
        self._sampling = eval_sampling(cfg, self._data.eval, self._tokenizer, self.seed)
        self._reference = build_reference(
            s, self._loss_fn, self._model, has_adapters=True, frozen_copy=None, datasets=self._data.splits(),
            collate_fn=self._data.collate, fingerprint=self._fingerprint, tokenizer=self._tokenizer,
        )  # fmt: skip

        self._steps_per_epoch = s.steps_per_epoch(len(self._data.train), self._world_size)
        self._total_steps = self._steps_per_epoch * s.epochs
        # the sharded adapters are the master weights (fp32 with dtype bf16, see sharded_lora_model): stepped in place
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
                f"{s.gradient_accumulation_steps} micro-batches, {len(self._data.train)} train pairs, "
                f"{self._steps_per_epoch} steps/epoch x {s.epochs} epochs, loss {self._loss_fn}, reference "
                f"{self._reference.describe()}; the optimizer steps {self._master.describe()}"
            )

    # -------------------------------------------------------------------------------------------- the step

    def _forward(self, batch: dict[str, torch.Tensor], split: str):
        """Policy log-probs (with grad), reference log-probs (cached, or adapters off; no grad), the loss."""
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
                if due(progress.global_step, s.save_every_n_steps):  # the last one with the merged HF model
                    last = progress.global_step == self._total_steps
                    self.save_checkpoint(consolidate=s.consolidate_every_save or last)
            progress.next_epoch(epoch)
        step_log.close()
        if progress.needs_final_eval(self._data.eval is not None):
            self.evaluate()
        if progress.needs_final_save():
            self.save_checkpoint(consolidate=True)

    def evaluate(self) -> dict[str, float]:
        """Loss, preference accuracy and margins on the held-out pairs (policy vs reference), and with
        ``eval_samples`` responses of policy and reference (adapters off): logged as eval/*."""
        self.progress.last_eval_step = self.progress.global_step
        return evaluate(self._model, partial(self._forward, split="eval"), self._data.eval, self._data.collate,
                        self.settings.batch_size, self.settings.device, step=self.progress.global_step,
                        metric_logger=self._metric_logger, sampling=self._sampling,
                        reference=self._reference.sampling_context)  # fmt: skip

    # ------------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, consolidate: bool = False) -> Path:
        """``step_<N>/``: PEFT adapter, DCP shards of adapters + optimizer, LR schedule, progress, per-rank RNG;
        with ``consolidate`` also the merged HF model, gathered and written by rank 0 (``checkpointing.sharded``)."""
        state = {**self.progress.counters(), "lr_scheduler": self._lr_scheduler.state_dict(), "run": self._fingerprint}
        path = self.settings.output_dir / f"step_{self.progress.global_step}"
        try:
            save_sharded_checkpoint(path, self._model, self._optimizer, state, adapters_only=True,
                                    hf_files=lora_model_files(self._model, self._lora, self.settings.dtype,
                                                              self.settings.device, consolidate),
                                    checkpointer=self._checkpointer, hf_dtype=self.settings.dtype)  # fmt: skip
        except Exception as error:  # disk full, read-only, ...: one message naming the path and the last good one
            raise save_failed(path, error, self.progress.last_checkpoint) from None
        self.progress.saved(path, " (with the merged HF model)" if consolidate else "")
        return path

    def _load_recipe_state(self, checkpoint_dir: Path) -> None:
        # the shards hold the adapters and their optimizer state; the frozen base came from the base checkpoint
        counters = load_sharded_checkpoint(checkpoint_dir, self._model, self._optimizer, self._lr_scheduler,
                                           self._fingerprint, adapters_only=True)  # fmt: skip
        self.progress.resume(counters, checkpoint_dir)

    def cleanup(self) -> None:
        close_metric_logger(self._metric_logger, self.settings.output_dir)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    with process_group(cfg.device, cfg.get("collective_timeout_seconds", 1800)):  # NCCL on CUDA, gloo on CPU
        if dist.get_rank() == 0:
            config.log_config(recipe_name="LoRADPORecipeDistributed", cfg=cfg)
        recipe = LoRADPORecipeDistributed(cfg)
        recipe.setup(cfg)
        recipe.train()
        recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
