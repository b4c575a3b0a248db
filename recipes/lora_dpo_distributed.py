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
- Speed switches, as in the single-device recipe: ``group_by_length``, ``prefix_sharing``, ``logprob_chunk_size``,
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
import shutil
import sys
import time
import traceback
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from torchtune import config, modules, training, utils
from torchtune.modules.peft import disable_adapter, get_adapter_params, get_adapter_state_dict, set_trainable_params
from tqdm import tqdm

from dpo_components.checkpointing import (
    check_same_run,
    checkpoint_fingerprint,
    claim_output_dir,
    load_recipe_state,
    load_state_file,
    lora_settings,
    merge_lora_state,
    peft_adapter_config,
    remove_stale_temporaries,
    resume_checkpoint,
    run_fingerprint,
    save_checkpoint_dir,
    save_failed,
    write_manifest,
)
from dpo_components.config_checks import (
    ConfigError,
    check_checkpoint_paths,
    check_positive,
    check_step_counts,
    instantiate_loss,
    optional_component,
    prepare_missing_inputs,
)
from dpo_components.distributed import (
    all_reduce_metrics,
    eval_batch_starts,
    from_rank_zero,
    initial_adapter_state,
    load_or_compute_together,
    rank_slice,
    shard_and_load,
)
from dpo_components.models import unscale_dora_bias
from dpo_components.reference import (
    compute_reference_logprobs,
    reference_cache_key,
    reference_for_batch,
    reference_variant,
)
from dpo_components.samples import adapters_off, eval_sampling, log_samples, sample_and_score
from dpo_components.training import (
    PreferenceMetrics,
    batch_order,
    collator_from_config,
    concatenated_logprobs,
    peak_memory_gib,
    rng_state,
    set_rng_state,
)

log = utils.get_logger("INFO")
# DCP checkpoints hold the trainable parameters (the adapters) and their optimizer state, not the frozen base
ADAPTERS_ONLY = StateDictOptions(ignore_frozen_params=True)


class LoRADPORecipeDistributed:
    def __init__(self, cfg: DictConfig) -> None:
        self._world_size, self._rank = dist.get_world_size(), dist.get_rank()
        self._is_rank_zero = self._rank == 0
        if cfg.device == "cuda":
            self._device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self._device)
        else:
            self._device = torch.device(cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        if self._dtype == torch.float16:
            raise ConfigError("dtype fp16 is not supported (no loss scaling); use bf16 or fp32")
        self._output_dir = Path(cfg.output_dir)
        self.seed = training.set_seed(cfg.seed)  # the global seed; torch is seeded with seed + rank (dropout)
        self._batch_size = cfg.batch_size  # per rank
        self._grad_accum = cfg.gradient_accumulation_steps
        self._total_epochs = cfg.epochs
        self._max_steps_per_epoch = cfg.get("max_steps_per_epoch")
        self._clip_grad_norm = cfg.get("clip_grad_norm")
        self._chunk_size = cfg.get("logprob_chunk_size", 256)
        self._log_every = cfg.get("log_every_n_steps", 1)
        self._eval_every = cfg.get("eval_every_n_steps")
        self._save_every = cfg.get("save_every_n_steps")
        self._consolidate_every_save = cfg.get("consolidate_every_save", False)
        self._shuffle = cfg.get("shuffle", True)
        self._group_by_length = cfg.get("group_by_length", False)
        self._prefix_sharing = cfg.get("prefix_sharing", False)
        if self._group_by_length and not self._shuffle:
            raise ConfigError("group_by_length: true needs shuffle: true (the groups are drawn from a shuffled order)")
        self._resume = cfg.get("resume_from_checkpoint", False)
        self._overwrite = cfg.get("overwrite_output_dir", False)
        self._reference_cfg = cfg.get("reference") or DictConfig({})
        self._reference_mode = self._reference_cfg.get("mode", "model")
        if self._reference_mode not in ("model", "precomputed"):
            raise ConfigError(f"reference.mode must be 'model' or 'precomputed', not {self._reference_mode!r}")
        check_positive(cfg, "batch_size", "gradient_accumulation_steps", "epochs")
        check_step_counts(cfg)
        prepare_missing_inputs(cfg)  # the tiny configs build their model and data on first use (file-locked)
        check_checkpoint_paths(cfg.checkpointer, cfg.output_dir)
        self.global_step = 0
        self.epochs_run = 0
        self._batches_done_in_epoch = 0
        self._last_checkpoint: Path | None = None
        self._last_eval_step: int | None = None

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        if self._is_rank_zero:  # no rank saves before the first steps' collectives: no race with these
            claim_output_dir(self._output_dir, self._resume, self._overwrite)  # no mixing with an earlier run
            remove_stale_temporaries(self._output_dir)  # what a killed or failed save left behind
        self._metric_logger = config.instantiate(cfg.metric_logger) if self._is_rank_zero else None
        if self._metric_logger is not None:
            self._metric_logger.log_config(cfg)
        # the newest checkpoint whose files match its manifest (a corrupt newer one is skipped with a warning)
        resume_dir = from_rank_zero(resume_checkpoint, self._output_dir) if self._resume else None

        self._checkpointer = config.instantiate(cfg.checkpointer, resume_from_checkpoint=False)
        self._model = self._setup_model(cfg, self._checkpointer.load_checkpoint()[training.MODEL_KEY])
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._loss_fn = instantiate_loss(cfg.loss)
        self._train_data = config.instantiate(cfg.dataset, self._tokenizer)
        # what this run is trained with (config keys, data and checkpoint hashes): a resume must match it
        self._fingerprint = from_rank_zero(run_fingerprint, cfg, self._train_data, seed=self.seed,
                                           world_size=self._world_size)  # fmt: skip
        if resume_dir is not None:  # checked before the long parts of setup (reference log-probs)
            check_same_run(resume_dir, checkpoint_fingerprint(resume_dir), self._fingerprint)
        eval_cfg = optional_component(cfg, "eval_dataset")
        self._eval_data = config.instantiate(eval_cfg, self._tokenizer) if eval_cfg else None
        if self._eval_every and self._eval_data is None:
            raise ConfigError("eval_every_n_steps is set but there is no eval_dataset")
        # eval_samples: responses of policy and reference to held-out prompts, sampled at every eval
        self._samples, self._sample_prompts = eval_sampling(cfg, self._eval_data)
        self._global_batch = self._batch_size * self._world_size
        if len(self._train_data) < self._global_batch * self._grad_accum:
            raise ConfigError(
                f"the dataset has {len(self._train_data)} pairs, fewer than one step's batch_size x world size x "
                f"gradient_accumulation_steps = {self._global_batch * self._grad_accum}"
            )
        self._collate = collator_from_config(cfg, self._tokenizer.pad_id, self._model.max_seq_len,
                                             dataset=self._train_data, eval_dataset=self._eval_data)  # fmt: skip
        self._reference_cache = self._setup_reference(cfg)

        steps_per_epoch = len(self._train_data) // (self._global_batch * self._grad_accum)
        if self._max_steps_per_epoch is not None:
            steps_per_epoch = min(steps_per_epoch, self._max_steps_per_epoch)
        self._steps_per_epoch = steps_per_epoch
        self._total_steps = steps_per_epoch * self._total_epochs
        self._optimizer = config.instantiate(cfg.optimizer, [p for p in self._model.parameters() if p.requires_grad])
        self._lr_scheduler = config.instantiate(cfg.lr_scheduler, self._optimizer, num_training_steps=self._total_steps)
        if resume_dir is not None:
            self._load_checkpoint(resume_dir)
        if self._is_rank_zero:
            reference = "none"
            if self._loss_fn.needs_reference:
                reference = "precomputed (cached)" if self._reference_cache else "base model, adapters off"
            log.info(
                f"{self._world_size} ranks ({dist.get_backend()}), {len(self._train_data)} pairs, global batch "
                f"{self._global_batch} x {self._grad_accum} micro-batches, {steps_per_epoch} steps/epoch x "
                f"{self._total_epochs} epochs; loss {self._loss_fn}; reference {reference}"
            )

    def _setup_model(self, cfg: DictConfig, base_state: dict[str, Any]) -> torch.nn.Module:
        """Build on the meta device, make only the adapters trainable, shard (FSDP2), load base + starting adapters.
        (A resume loads its adapters from the checkpoint afterwards.)"""
        with training.set_default_dtype(self._dtype), torch.device("meta"):
            model = unscale_dora_bias(config.instantiate(cfg.model))  # DoRA as exported
        self._lora = lora_settings(cfg.model)
        set_trainable_params(model, get_adapter_params(model))
        adapters = initial_adapter_state(model, base_state, self.seed)  # before checkpoint wrappers rename modules
        if cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        shard_and_load(model, {**base_state, **adapters}, self._device, self._dtype,
                       reshard=cfg.get("fsdp_reshard_after_forward", True))  # fmt: skip
        if cfg.get("compile", False):
            training.compile_model(model)
        return model

    def _setup_reference(self, cfg: DictConfig) -> dict[str, dict[str, torch.Tensor]]:
        """With ``reference.mode: precomputed``: the reference log-probs of every train and eval pair, read from the
        cache or computed by all ranks together (base model, adapters off) and written by rank 0."""
        if self._reference_mode != "precomputed" or not self._loss_fn.needs_reference:
            return {}
        cache_dir = Path(self._reference_cfg.get("cache_dir") or self._output_dir / "reference_cache")
        batch_size = self._reference_cfg.get("batch_size", self._batch_size)
        cache = {}
        for split, data in (("train", self._train_data), ("eval", self._eval_data)):
            if data is None:
                continue
            key = reference_cache_key(data, self._fingerprint["base_checkpoint"], self._dtype, reference_variant(cfg))
            path = cache_dir / f"reference_logps_{key}.safetensors"
            cache[split], reused = load_or_compute_together(path, partial(self._reference_pass, data, batch_size),
                                                            self._device)  # fmt: skip
            if self._is_rank_zero:
                log.info(f"reference log-probs for {split}: {'reused' if reused else 'computed'} {path}")
        return cache

    @torch.no_grad()
    def _reference_pass(self, data, batch_size: int) -> dict[str, torch.Tensor]:
        with disable_adapter(self._model):
            return compute_reference_logprobs(self._model, data, self._collate, batch_size, self._device,
                                              self._chunk_size, self._rank, self._world_size)  # fmt: skip

    # -------------------------------------------------------------------------------------------- the step

    def _forward(self, batch: dict[str, torch.Tensor], split: str):
        """Policy (with grad) and reference (cached, or adapters off and no grad) log-probs, then the loss."""
        batch = {k: v.to(self._device) for k, v in batch.items()}
        policy = concatenated_logprobs(self._model, batch, self._chunk_size)
        reference = None
        if self._loss_fn.needs_reference:
            if self._reference_cache:
                reference = reference_for_batch(self._reference_cache[split], batch["index"].cpu(), self._device)
            else:
                with torch.no_grad(), disable_adapter(self._model):
                    reference = concatenated_logprobs(self._model, batch, self._chunk_size)
        return self._loss_fn(policy, reference), policy

    def train(self) -> None:
        metrics, interval_start = PreferenceMetrics(), time.perf_counter()
        progress = tqdm(total=self._total_steps, initial=self.global_step, desc="DPO", dynamic_ncols=True,
                        disable=not self._is_rank_zero)  # fmt: skip
        trainable = [p for p in self._model.parameters() if p.requires_grad]
        for epoch in range(self.epochs_run, self._total_epochs):
            # the same order on every rank; with group_by_length each global batch holds pairs of similar length
            order = rank_slice(batch_order(self._train_data, self.seed, epoch, self._global_batch, self._shuffle,
                                           self._group_by_length, self._prefix_sharing), self._batch_size)  # fmt: skip
            loader = DataLoader(self._train_data, batch_size=self._batch_size, collate_fn=self._collate,
                                sampler=order[self._batches_done_in_epoch * self._batch_size :], drop_last=True,
                                generator=torch.Generator())  # fmt: skip
            self._model.train()
            for batch in loader:
                if self._batches_done_in_epoch // self._grad_accum >= self._steps_per_epoch:
                    break
                out, policy = self._forward(batch, "train")
                loss = out.losses.mean()
                (loss / self._grad_accum).backward()
                metrics.update(out, policy, batch)
                self._batches_done_in_epoch += 1
                if self._batches_done_in_epoch % self._grad_accum:
                    continue

                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm=float(self._clip_grad_norm or math.inf))
                if isinstance(grad_norm, DTensor):
                    grad_norm = grad_norm.full_tensor()
                logged = all_reduce_metrics(metrics, self._device)
                if not (math.isfinite(logged["loss"]) and torch.isfinite(grad_norm)):
                    self._stop_on_nonfinite(logged["loss"], grad_norm.item())
                self._optimizer.step()
                self._optimizer.zero_grad(set_to_none=True)
                self._lr_scheduler.step()
                self.global_step += 1
                progress.update(1)

                if self.global_step % self._log_every == 0:
                    seconds = time.perf_counter() - interval_start
                    logged.update(lr=self._optimizer.param_groups[0]["lr"], grad_norm=grad_norm.item(),
                                  tokens_per_second=logged.pop("tokens") / seconds,
                                  peak_memory_gib=peak_memory_gib(self._device))  # fmt: skip
                    if self._metric_logger is not None:
                        self._metric_logger.log_dict(logged, step=self.global_step)
                    progress.set_postfix(loss=f"{logged['loss']:.4f}", acc=f"{logged['rewards/accuracies']:.2f}")
                    metrics, interval_start = PreferenceMetrics(), time.perf_counter()
                if self._eval_every and self.global_step % self._eval_every == 0:
                    self.evaluate()
                if self._save_every and self.global_step % self._save_every == 0:
                    last = self.global_step == self._total_steps  # the final save: with the HF model
                    self.save_checkpoint(consolidate=self._consolidate_every_save or last)
            self.epochs_run, self._batches_done_in_epoch = epoch + 1, 0
        progress.close()
        if self._eval_data is not None and self._last_eval_step != self.global_step:
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
        for start, counted in eval_batch_starts(len(self._eval_data), self._batch_size):
            end = min(start + self._batch_size, len(self._eval_data))
            batch = self._collate([self._eval_data[j] for j in range(start, end)])
            out, policy = self._forward(batch, "eval")  # every rank runs the same number of forwards
            if counted:
                metrics.update(out, policy)
        results = {f"eval/{k}": v for k, v in all_reduce_metrics(metrics, self._device).items() if k != "tokens"}
        rows = []
        if self._samples:  # each rank samples a share with the sharded model; the reference is adapters off
            sampled, rows = sample_and_score(self._model, partial(adapters_off, self._model), self._sample_prompts,
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
        with ``consolidate`` also the merged HF model. Written under a temporary name, manifest last, renamed."""
        final = self._output_dir / f"step_{self.global_step}"
        tmp = self._output_dir / f".step_{self.global_step}.tmp"
        try:
            self._write_checkpoint(tmp, final, consolidate)
        except Exception as error:  # disk full, read-only, ...: one message naming the path and the last good one
            if self._is_rank_zero:
                shutil.rmtree(tmp, ignore_errors=True)
            raise save_failed(final, error, self._last_checkpoint) from None
        self._last_checkpoint = final
        return final

    def _write_checkpoint(self, tmp: Path, final: Path, consolidate: bool) -> None:
        if self._is_rank_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        adapter_shards, optim_shards = get_state_dict(self._model, self._optimizer, options=ADAPTERS_ONLY)
        dcp.save({"model": adapter_shards, "optimizer": optim_shards}, checkpoint_id=str(tmp / "dcp"))
        torch.save(rng_state(), tmp / f"rng_rank{self._rank}.pt")
        # rank 0 gathers the adapters (every save) or the whole model (consolidated saves): all ranks take part
        if consolidate:
            full = training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)
            adapter = get_adapter_state_dict(full)
        else:
            adapter = {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v.detach().cpu()
                       for k, v in self._model.state_dict().items() if "lora" in k or "magnitude" in k}  # fmt: skip
        dist.barrier()  # every rank's files are written before rank 0 renames the directory
        if self._is_rank_zero:
            merged = None
            if consolidate:  # base (dequantized for QLoRA) + LoRA, in the run's dtype
                merged = merge_lora_state(full, self._lora["rank"], self._lora["alpha"], self._dtype)
            save_checkpoint_dir(self._checkpointer, tmp / "hf", model_state=merged, adapter_state=adapter,
                                adapter_config=peft_adapter_config(self._lora))  # fmt: skip
            for path in (tmp / "hf").iterdir():
                path.rename(tmp / path.name)
            (tmp / "hf").rmdir()
            torch.save({"global_step": self.global_step, "epochs_run": self.epochs_run,
                        "batches_done_in_epoch": self._batches_done_in_epoch,
                        "lr_scheduler": self._lr_scheduler.state_dict(), "run": self._fingerprint},
                       tmp / "recipe_state.pt")  # fmt: skip
            write_manifest(tmp, run=self._fingerprint)  # last: a checkpoint is complete only with it
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            log.info(f"saved checkpoint {final}{' (with the merged HF model)' if consolidate else ''}")
        dist.barrier()

    def _load_checkpoint(self, checkpoint_dir: Path) -> None:
        state = load_recipe_state(checkpoint_dir)
        check_same_run(checkpoint_dir, state["run"], self._fingerprint)  # world_size included: DCP shards
        adapter_shards, optim_shards = get_state_dict(self._model, self._optimizer, options=ADAPTERS_ONLY)
        shards = {"model": adapter_shards, "optimizer": optim_shards}
        dcp.load(shards, checkpoint_id=str(checkpoint_dir / "dcp"))
        # not strict: the frozen base is not in the checkpoint (it was loaded from the base checkpoint)
        incompatible = set_state_dict(self._model, self._optimizer, model_state_dict=shards["model"],
                                      optim_state_dict=shards["optimizer"],
                                      options=StateDictOptions(ignore_frozen_params=True, strict=False))  # fmt: skip
        missing = [k for k in incompatible.missing_keys if "lora" in k or "magnitude" in k]
        if missing or incompatible.unexpected_keys:
            raise ConfigError(f"{checkpoint_dir} does not fit this model's adapters: missing {missing[:5]}, "
                              f"unexpected {incompatible.unexpected_keys[:5]}")  # fmt: skip
        self._lr_scheduler.load_state_dict(state["lr_scheduler"])
        set_rng_state(load_state_file(checkpoint_dir / f"rng_rank{self._rank}.pt"))
        self.global_step = state["global_step"]
        self.epochs_run = state["epochs_run"]
        self._batches_done_in_epoch = state["batches_done_in_epoch"]
        self._last_checkpoint = checkpoint_dir
        if self._is_rank_zero:
            log.info(f"resumed from {checkpoint_dir} at step {self.global_step}")

    def cleanup(self) -> None:
        if self._metric_logger is not None:
            self._metric_logger.close()
            log.info(f"plot this run: python -m dpo_components.plot {self._output_dir}")


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
