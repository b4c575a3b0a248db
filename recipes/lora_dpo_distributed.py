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
- An error on one rank is printed and ends that rank at once (no barrier after a failure); torchrun stops the rest.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from torchtune import config, modules, training, utils
from torchtune.modules.peft import get_adapter_params, get_adapter_state_dict, set_trainable_params
from tqdm import tqdm

from dpo_components.checkpointing import (
    check_same_run,
    checkpoint_fingerprint,
    load_sharded_checkpoint,
    lora_settings,
    merge_lora_state,
    peft_adapter_config,
    prepare_output_dir,
    run_fingerprint,
    save_failed,
    save_sharded_checkpoint,
)
from dpo_components.data.order import batch_order
from dpo_components.data.recipe_data import load_recipe_data
from dpo_components.distributed import (
    agree_micro_batches,
    all_reduce_metrics,
    eval_batch_starts,
    from_rank_zero,
    initial_adapter_state,
    rank_slice,
    shard_and_load,
)
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.metrics import PreferenceMetrics, ZeroGradientWatch, peak_memory_gib
from dpo_components.models import apply_model_fixes
from dpo_components.precision import MasterWeights, fsdp_mixed_precision, trainable_to
from dpo_components.reference import build_reference, reference_variant
from dpo_components.samples import eval_sampling, log_samples, sample_and_score
from dpo_components.settings import RecipeSettings, instantiate_loss, prepare_and_check_inputs

log = utils.get_logger("INFO")


class LoRADPORecipeDistributed:
    def __init__(self, cfg: DictConfig) -> None:
        self._world_size, self._rank = dist.get_world_size(), dist.get_rank()
        self._is_rank_zero = self._rank == 0
        # every shared key, its default and its check: dpo_components.settings (the reference is adapters off)
        self.settings = RecipeSettings.from_config(cfg, reference_checkpointer=False)
        self.seed = training.set_seed(self.settings.seed)  # the global seed; torch is seeded with seed + rank
        prepare_and_check_inputs(cfg)  # the tiny configs build their model and data on first use (file-locked)
        self.global_step = 0
        self.epochs_run = 0
        self._batches_done_in_epoch = 0
        self._last_checkpoint: Path | None = None
        self._last_eval_step: int | None = None

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        s = self.settings
        self._loss_fn = instantiate_loss(cfg.loss, s)  # first: a loss the settings refuse stops here
        # rank 0: no mixing with an earlier run, leftovers of killed saves removed, the newest complete checkpoint
        resume_dir = from_rank_zero(prepare_output_dir, s.output_dir, s.resume, s.overwrite_output_dir)
        self._metric_logger = config.instantiate(cfg.metric_logger) if self._is_rank_zero else None
        if self._metric_logger is not None:
            self._metric_logger.log_config(cfg)

        self._checkpointer = config.instantiate(cfg.checkpointer, resume_from_checkpoint=False)
        self._model = self._setup_model(cfg, self._checkpointer.load_checkpoint()[training.MODEL_KEY])
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._global_batch = s.batch_size * self._world_size  # batch_size is per rank
        self._data = load_recipe_data(cfg, s, self._tokenizer, self._model.max_seq_len, self._world_size,
                                      loss=self._loss_fn)
        # what this run is trained with (config keys, data and checkpoint hashes): a resume must match it
        self._fingerprint = from_rank_zero(run_fingerprint, cfg, self._data.train, seed=self.seed,
                                           world_size=self._world_size)  # fmt: skip
        if resume_dir is not None:  # checked before the long parts of setup (reference log-probs)
            check_same_run(resume_dir, checkpoint_fingerprint(resume_dir), self._fingerprint)
        # eval_samples: responses of policy and reference to held-out prompts, sampled at every eval
        self._samples, self._sample_prompts = eval_sampling(cfg, self._data.eval)
        self._reference = build_reference(
            s, self._loss_fn, self._model, has_adapters=True, frozen_copy=None, datasets=self._data.splits(),
            collate_fn=self._data.collate, fingerprint=self._fingerprint, variant=reference_variant(cfg),
        )  # fmt: skip

        self._steps_per_epoch = s.steps_per_epoch(len(self._data.train), self._world_size)
        self._total_steps = self._steps_per_epoch * s.epochs
        # the sharded adapters are the master weights (fp32 with dtype bf16, see _setup_model): stepped in place
        self._master = MasterWeights(self._model.named_parameters(), s.master_dtype, seed=self.seed + self._rank)
        self._optimizer = config.instantiate(cfg.optimizer, self._master.params)
        self._lr_scheduler = config.instantiate(cfg.lr_scheduler, self._optimizer, num_training_steps=self._total_steps)
        if self._is_rank_zero:
            self._master.check_optimizer(self._optimizer)  # refuses what cannot step them; warns on lost updates
        if resume_dir is not None:
            self._load_checkpoint(resume_dir)
        if self._is_rank_zero:
            log.info(
                f"{self._world_size} ranks ({dist.get_backend()}), {len(self._data.train)} pairs, global batch "
                f"{self._global_batch} x {s.gradient_accumulation_steps} micro-batches, {self._steps_per_epoch} "
                f"steps/epoch x {s.epochs} epochs; loss {self._loss_fn}; reference {self._reference.describe()}; "
                f"the optimizer steps {self._master.describe()}"
            )

    def _setup_model(self, cfg: DictConfig, base_state: dict[str, Any]) -> torch.nn.Module:
        """Build on the meta device, make only the adapters trainable, shard (FSDP2), load base + starting adapters.
        (A resume loads its adapters from the checkpoint afterwards.)"""
        s = self.settings
        with training.set_default_dtype(s.dtype), torch.device("meta"):
            model = apply_model_fixes(config.instantiate(cfg.model))  # DoRA as exported, fused RMSNorm
        self._lora = lora_settings(cfg.model)
        set_trainable_params(model, get_adapter_params(model))
        adapters = initial_adapter_state(model, base_state, self.seed)  # before checkpoint wrappers rename modules
        trainable_to(model, s.master_dtype)  # fp32 adapter shards (master weights); FSDP computes in s.dtype
        if s.activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        shard_and_load(model, {**base_state, **adapters}, s.device, s.dtype, reshard=s.fsdp_reshard_after_forward,
                       mp_policy=fsdp_mixed_precision(s.dtype, s.master_dtype))  # fmt: skip
        if s.compile:
            training.compile_model(model)
        return model

    # -------------------------------------------------------------------------------------------- the step

    def _forward(self, batch: dict[str, torch.Tensor], split: str):
        """Policy log-probs (with grad), reference log-probs (cached, or adapters off; no grad), the loss."""
        batch = {k: v.to(self.settings.device) for k, v in batch.items()}
        policy = concatenated_logprobs(self._model, batch, self.settings.logprob_chunk_size,
                                       self.settings.flex_attention)  # fmt: skip
        return self._loss_fn(policy, self._reference.logprobs(batch, split)), policy

    def train(self) -> None:
        metrics, interval_start = PreferenceMetrics(), time.perf_counter()
        zero_gradients = ZeroGradientWatch(self._loss_fn)  # warns when the loss saturates (KTO at 1:4)
        loss_name = type(self._loss_fn).__name__.removesuffix("Loss")  # the progress bar: "DPO", "KTO", ...
        progress = tqdm(total=self._total_steps, initial=self.global_step, desc=loss_name, dynamic_ncols=True,
                        disable=not self._is_rank_zero)  # fmt: skip
        s = self.settings
        for epoch in range(self.epochs_run, s.epochs):
            # the same order on every rank; with group_by_length each global batch holds pairs of similar length
            order = rank_slice(batch_order(self._data.train, self.seed, epoch, self._global_batch, s.shuffle,
                                           s.group_by_length, s.prefix_sharing), s.batch_size)  # fmt: skip
            # one step's pairs at a time, split into micro-batches below
            loader = DataLoader(self._data.train, batch_size=s.batch_size * s.gradient_accumulation_steps,
                                collate_fn=list, sampler=order[self._batches_done_in_epoch * s.batch_size :],
                                drop_last=True, generator=torch.Generator())  # fmt: skip
            self._model.train()
            for samples in loader:
                if self._batches_done_in_epoch // s.gradient_accumulation_steps >= self._steps_per_epoch:
                    break
                # gradient_accumulation_steps micro-batches of batch_size pairs, or by max_micro_batch_tokens, as
                # many on every rank (each is a forward and backward through the sharded model)
                for members in agree_micro_batches(self._data.micro_batches(samples), s.device):
                    batch = self._data.collate([samples[i] for i in members])
                    out, policy = self._forward(batch, "train")
                    loss = out.losses.mean()
                    # weighted by its share of the step's pairs: the step's loss is the mean over all of them
                    (loss / (len(samples) / len(members))).backward()
                    metrics.update(out, policy, batch)
                self._batches_done_in_epoch += s.gradient_accumulation_steps

                grad_norm = torch.nn.utils.clip_grad_norm_(self._master.params,
                                                           max_norm=float(s.clip_grad_norm or math.inf))
                if isinstance(grad_norm, DTensor):
                    grad_norm = grad_norm.full_tensor()
                logged = all_reduce_metrics(metrics, self.settings.device)
                if not (math.isfinite(logged["loss"]) and torch.isfinite(grad_norm)):
                    self._stop_on_nonfinite(logged["loss"], grad_norm.item())
                if self._is_rank_zero:
                    zero_gradients.update(grad_norm.item(), self.global_step + 1)
                lr = self._optimizer.param_groups[0]["lr"]  # the rate this step uses (logged with it)
                logging_step = (self.global_step + 1) % s.log_every_n_steps == 0
                # optimizer.step(); on logging steps also the share of sampled weights the step left unchanged
                unchanged = self._master.step(self._optimizer, measure=logging_step)  # (a collective then)
                self._optimizer.zero_grad(set_to_none=True)
                self._lr_scheduler.step()
                self.global_step += 1
                progress.update(1)

                if self.global_step % s.log_every_n_steps == 0:
                    seconds = time.perf_counter() - interval_start
                    logged.update(lr=lr, grad_norm=grad_norm.item(), unchanged_weight_share=unchanged,
                                  tokens_per_second=logged.pop("tokens") / seconds,
                                  peak_memory_gib=peak_memory_gib(s.device))  # fmt: skip
                    if self._metric_logger is not None:
                        self._metric_logger.log_dict(logged, step=self.global_step)
                    progress.set_postfix(loss=f"{logged['loss']:.4f}", acc=f"{logged['rewards/accuracies']:.2f}")
                    metrics, interval_start = PreferenceMetrics(), time.perf_counter()
                if s.eval_every_n_steps and self.global_step % s.eval_every_n_steps == 0:
                    self.evaluate()
                if s.save_every_n_steps and self.global_step % s.save_every_n_steps == 0:
                    last = self.global_step == self._total_steps  # the final save: with the HF model
                    self.save_checkpoint(consolidate=s.consolidate_every_save or last)
            self.epochs_run, self._batches_done_in_epoch = epoch + 1, 0
        progress.close()
        if self._data.eval is not None and self._last_eval_step != self.global_step:
            self.evaluate()
        if self._last_checkpoint is None or self._last_checkpoint.name != f"step_{self.global_step}":
            self.save_checkpoint(consolidate=True)

    def _stop_on_nonfinite(self, loss: float, grad_norm: float) -> None:
        raise FloatingPointError(
            f"loss {loss} / gradient norm {grad_norm} at step {self.global_step + 1}; stopping before the optimizer "
            f"step. Last good checkpoint: {self._last_checkpoint or 'none saved yet'}."
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss, accuracy and margins; each rank takes every W-th batch, results all-reduced."""
        was_training = self._model.training
        self._model.eval()
        metrics = PreferenceMetrics()
        eval_data, batch_size = self._data.eval, self.settings.batch_size
        for start, counted in eval_batch_starts(len(eval_data), batch_size):
            end = min(start + batch_size, len(eval_data))
            batch = self._data.collate([eval_data[j] for j in range(start, end)])
            out, policy = self._forward(batch, "eval")  # every rank runs the same number of forwards
            if counted:
                metrics.update(out, policy)
        reduced = all_reduce_metrics(metrics, self.settings.device)
        results = {f"eval/{k}": v for k, v in reduced.items() if k != "tokens"}
        rows = []
        if self._samples:  # each rank samples a share with the sharded model; the reference is adapters off
            sampled, rows = sample_and_score(self._model, self._reference.sampling_context, self._sample_prompts,
                                             self._tokenizer, self._samples, self.seed)  # fmt: skip
            results.update(sampled)
        if self._metric_logger is not None:
            log_samples(self._metric_logger, rows, self.global_step)
            self._metric_logger.log_dict(results, step=self.global_step)
            summary = ", ".join(f"{k.removeprefix('eval/')} {results[k]:.4f}" for k in
                                ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"))  # fmt: skip
            log.info(f"step {self.global_step} eval: {summary}")
        self._last_eval_step = self.global_step
        self._model.train(was_training)
        return results

    # ------------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, consolidate: bool = False) -> Path:
        """``step_<N>/``: PEFT adapter, DCP shards of adapters + optimizer, LR schedule, progress, per-rank RNG;
        with ``consolidate`` also the merged HF model, gathered and written by rank 0 (``checkpointing.sharded``)."""
        path = self.settings.output_dir / f"step_{self.global_step}"
        state = {"global_step": self.global_step, "epochs_run": self.epochs_run, "lr_scheduler":
                 self._lr_scheduler.state_dict(), "batches_done_in_epoch": self._batches_done_in_epoch,
                 "run": self._fingerprint}  # fmt: skip

        def hf_files() -> dict[str, Any] | None:
            # rank 0 gathers the adapters (every save) or the whole model (consolidated saves): all ranks take part
            if consolidate:
                full = training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self.settings.device)
                adapter = get_adapter_state_dict(full)
            else:
                adapter = {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v.detach().cpu()
                           for k, v in self._model.state_dict().items() if "lora" in k or "magnitude" in k}  # fmt: skip
            if not self._is_rank_zero:
                return None
            merged = None  # with consolidate: base (dequantized for QLoRA) + LoRA, in the run's dtype
            if consolidate:
                merged = merge_lora_state(full, self._lora["rank"], self._lora["alpha"], self.settings.dtype)
            return {"model_state": merged, "adapter_state": adapter, "adapter_config": peft_adapter_config(self._lora)}

        try:
            save_sharded_checkpoint(path, self._model, self._optimizer, state, adapters_only=True, hf_files=hf_files,
                                    checkpointer=self._checkpointer, hf_dtype=self.settings.dtype)  # fmt: skip
        except Exception as error:  # disk full, read-only, ...: one message naming the path and the last good one
            raise save_failed(path, error, self._last_checkpoint) from None
        if self._is_rank_zero:
            log.info(f"saved checkpoint {path}{' (with the merged HF model)' if consolidate else ''}")
        self._last_checkpoint = path
        return path

    def _load_checkpoint(self, checkpoint_dir: Path) -> None:
        # the shards hold the adapters and their optimizer state; the frozen base came from the base checkpoint
        progress = load_sharded_checkpoint(checkpoint_dir, self._model, self._optimizer, self._lr_scheduler,
                                           self._fingerprint, adapters_only=True)  # fmt: skip
        self.global_step = progress["global_step"]
        self.epochs_run = progress["epochs_run"]
        self._batches_done_in_epoch = progress["batches_done_in_epoch"]
        self._last_checkpoint = checkpoint_dir
        if self._is_rank_zero:
            log.info(f"resumed from {checkpoint_dir} at step {self.global_step}")

    def cleanup(self) -> None:
        if self._metric_logger is not None:
            self._metric_logger.close()
            log.info(f"plot this run: python -m dpo_components.tools.plot {self.settings.output_dir}")


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    # NCCL for CUDA, gloo for CPU. A collective that waits longer than collective_timeout_seconds fails instead of
    # hanging; the default, 30 minutes, leaves time for rank 0 to write the merged model while the others wait.
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=cfg.get("collective_timeout_seconds", 1800)))
    try:
        if dist.get_rank() == 0:
            config.log_config(recipe_name="LoRADPORecipeDistributed", cfg=cfg)
        recipe = LoRADPORecipeDistributed(cfg)
        recipe.setup(cfg)
        recipe.train()
        recipe.cleanup()
    except BaseException:
        # No barrier and no teardown after a failure: the other ranks may sit in a collective this rank will never
        # join. Print this rank's error and leave at once; torchrun then stops the other ranks.
        log.error(f"rank {dist.get_rank()} failed:\n{traceback.format_exc()}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    dist.barrier()  # every rank done before the group goes away (avoids teardown aborts on gloo)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(recipe_main())
