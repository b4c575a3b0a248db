"""Full-parameter DPO (or any preference loss) on several GPUs or CPU processes with FSDP2, one node or many.

    tune run --nproc_per_node 2 recipes/full_dpo_distributed.py --config recipe_configs/tiny/full_dpo_distributed.yaml
    torchrun --nproc_per_node 8 recipes/full_dpo_distributed.py --config recipe_configs/llama3_1/8B_full_dpo.yaml
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 recipes/... (each node)

PyTorch's own engine: ``torch.distributed`` with NCCL on CUDA and gloo on CPU, the policy sharded with FSDP2
(``fully_shard`` per transformer layer, then the root), launched by torchrun.

- The global batch of a micro-step is ``batch_size`` pairs per rank x world size; the ranks take consecutive slices
  of the same seeded order, so 2 ranks x batch 4 train on exactly the pairs 1 process x batch 8 would, and FSDP
  averages the gradients: the step is the same (tested).
- Reference (``reference.mode``): ``model``, a frozen FSDP-sharded copy loaded from ``reference.checkpointer``
  (default: the policy's starting checkpoint), in eval mode with no grads; or ``precomputed``, one no-grad pass
  over the train and eval pairs before training (the ranks split the batches), cached on disk keyed by (tokenized
  data, reference checkpoint, dtype) and reused by later runs; no reference model is kept then.
- Speed switches, as in the single-device recipes: ``group_by_length`` (each global batch holds pairs of similar
  length) and ``prefix_sharing`` (one [prompt | chosen | rejected] row per pair, the prompt encoded once).
- Metrics are all-reduced and averaged over ranks and micro-batches; only rank 0 logs and shows progress.
- Checkpoints: ``step_<N>/`` with distributed checkpointing (DCP: sharded model and optimizer, each rank writes its
  shard) plus the LR schedule, data position and every rank's RNG, for an exact resume on the same world size;
  at the end (and every save with ``consolidate_every_save: true``) also the consolidated Hugging Face
  safetensors + config.json, written by rank 0. Each ``step_<N>`` is written under a temporary name and renamed.
- ``eval_samples: N``: each rank samples a share of the held-out prompts with the sharded models at every eval.
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
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from torchtune import config, modules, training, utils
from tqdm import tqdm

from dpo_components.checkpointing import (
    check_same_run,
    checkpoint_fingerprint,
    claim_output_dir,
    load_recipe_state,
    load_state_file,
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
    all_ranks_have,
    all_reduce_metrics,
    eval_batch_starts,
    from_rank_zero,
    load_or_compute_together,
    rank_slice,
    shard_and_load,
)
from dpo_components.reference import (
    compute_reference_logprobs,
    reference_cache_key,
    reference_for_batch,
    reference_variant,
)
from dpo_components.samples import eval_sampling, log_samples, same_model, sample_and_score
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
REFERENCE_MODES = ("model", "precomputed")


class FullDPORecipeDistributed:
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
        if self._reference_mode not in REFERENCE_MODES:
            raise ConfigError(f"reference.mode must be one of {REFERENCE_MODES}, got '{self._reference_mode}'")
        check_positive(cfg, "batch_size", "gradient_accumulation_steps", "epochs")
        check_step_counts(cfg)
        prepare_missing_inputs(cfg)  # the tiny configs build their model and data on first use (file-locked)
        check_checkpoint_paths(cfg.checkpointer, cfg.output_dir)
        if self._reference_cfg.get("checkpointer"):
            check_checkpoint_paths(self._reference_cfg.checkpointer, cfg.output_dir, key="reference.checkpointer")
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
        base_state = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
        self._model = self._sharded_model(cfg, base_state, trainable=True)
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
        self._setup_reference(cfg, base_state)
        del base_state

        steps_per_epoch = len(self._train_data) // (self._global_batch * self._grad_accum)
        if self._max_steps_per_epoch is not None:
            steps_per_epoch = min(steps_per_epoch, self._max_steps_per_epoch)
        self._steps_per_epoch = steps_per_epoch
        self._total_steps = steps_per_epoch * self._total_epochs
        self._optimizer = config.instantiate(cfg.optimizer, self._model.parameters())
        self._lr_scheduler = config.instantiate(cfg.lr_scheduler, self._optimizer, num_training_steps=self._total_steps)
        if resume_dir is not None:
            self._load_checkpoint(resume_dir)
        if self._is_rank_zero:
            log.info(
                f"{self._world_size} ranks ({dist.get_backend()}), {len(self._train_data)} pairs, global batch "
                f"{self._global_batch} x {self._grad_accum} micro-batches, {steps_per_epoch} steps/epoch x "
                f"{self._total_epochs} epochs; loss {self._loss_fn}; reference {self._reference_mode}"
            )

    def _sharded_model(self, cfg: DictConfig, state: dict[str, Any], trainable: bool) -> torch.nn.Module:
        """Build on the meta device, shard per transformer layer and the root (FSDP2), load the full weights."""
        with training.set_default_dtype(self._dtype), torch.device("meta"):
            model = config.instantiate(cfg.model)
        if trainable and cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        shard_and_load(model, state, self._device, self._dtype, reshard=cfg.get("fsdp_reshard_after_forward", True))
        if not trainable:
            model.eval()
            for param in model.parameters():
                param.requires_grad_(False)
        if trainable and cfg.get("compile", False):
            training.compile_model(model)
        return model

    def _setup_reference(self, cfg: DictConfig, base_state: dict[str, Any]) -> None:
        self._reference_model, self._reference_cache = None, {}
        if not self._loss_fn.needs_reference:
            return
        ref_cfg = self._reference_cfg
        ckpt_cfg = ref_cfg.checkpointer if ref_cfg.get("checkpointer") else cfg.checkpointer
        reference_digest = self._fingerprint.get("reference_checkpoint", self._fingerprint["base_checkpoint"])
        cache_files, splits = {}, {"train": self._train_data, "eval": self._eval_data}
        if self._reference_mode == "precomputed":
            cache_dir = Path(ref_cfg.get("cache_dir") or self._output_dir / "reference_cache")
            for split, data in splits.items():
                if data is not None:
                    key = reference_cache_key(data, reference_digest, self._dtype, reference_variant(cfg))
                    cache_files[split] = cache_dir / f"reference_logps_{key}.safetensors"
            if all_ranks_have(cache_files.values(), self._device):  # nothing to compute: build no reference model
                for split, path in cache_files.items():
                    self._reference_cache[split] = self._load_or_compute_together(path, None)
                return

        if ref_cfg.get("checkpointer"):
            state = config.instantiate(ckpt_cfg, resume_from_checkpoint=False).load_checkpoint()[training.MODEL_KEY]
        else:
            state = base_state
        reference = self._sharded_model(cfg, state, trainable=False)
        if self._reference_mode == "model":
            self._reference_model = reference
            return
        batch_size = ref_cfg.get("batch_size", self._batch_size)
        for split, path in cache_files.items():
            self._reference_cache[split] = self._load_or_compute_together(
                path, partial(compute_reference_logprobs, reference, splits[split], self._collate, batch_size,
                              self._device, self._chunk_size, self._rank, self._world_size),
            )  # fmt: skip
        del reference

    def _load_or_compute_together(self, cache_file: Path, compute) -> dict[str, torch.Tensor]:
        values, reused = load_or_compute_together(cache_file, compute, self._device)
        if self._is_rank_zero:
            log.info(f"reference log-probs: {'reused' if reused else 'computed'} {cache_file}")
        return values

    # -------------------------------------------------------------------------------------------- the step

    def _forward(self, batch: dict[str, torch.Tensor], split: str):
        batch = {k: v.to(self._device) for k, v in batch.items()}
        policy = concatenated_logprobs(self._model, batch, self._chunk_size)
        reference = None
        if self._loss_fn.needs_reference:
            if self._reference_mode == "precomputed":
                reference = reference_for_batch(self._reference_cache[split], batch["index"].cpu(), self._device)
            else:
                with torch.no_grad():
                    reference = concatenated_logprobs(self._reference_model, batch, self._chunk_size)
        return self._loss_fn(policy, reference), policy

    def _rank_order(self, epoch: int) -> list[int]:
        """This rank's sample order: its ``batch_size`` slice of every global batch of the epoch's order."""
        # the same on every rank; with group_by_length, each global batch holds pairs of similar length
        order = batch_order(self._train_data, self.seed, epoch, self._global_batch, self._shuffle,
                            self._group_by_length, self._prefix_sharing)  # fmt: skip
        return rank_slice(order, self._batch_size)

    def train(self) -> None:
        metrics, interval_start = PreferenceMetrics(), time.perf_counter()
        progress = tqdm(total=self._total_steps, initial=self.global_step, desc="DPO", dynamic_ncols=True,
                        disable=not self._is_rank_zero)  # fmt: skip
        for epoch in range(self.epochs_run, self._total_epochs):
            order = self._rank_order(epoch)
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

                grad_norm = torch.nn.utils.clip_grad_norm_(
                    self._model.parameters(), max_norm=float(self._clip_grad_norm or math.inf)
                )
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
        if self._samples:  # each rank samples a share with the sharded models (see dpo_components.samples)
            reference = partial(same_model, self._reference_model) if self._reference_model is not None else None
            sampled, rows = sample_and_score(self._model, reference, self._sample_prompts, self._tokenizer,
                                             self._samples, self.seed)  # fmt: skip
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
        """``step_<N>/``: DCP shards of model + optimizer, LR schedule, progress, per-rank RNG; optionally the
        consolidated HF safetensors (rank 0). Written under a temporary name, manifest last, renamed by rank 0."""
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
        model_state, optim_state = get_state_dict(self._model, self._optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / "dcp"))
        torch.save(rng_state(), tmp / f"rng_rank{self._rank}.pt")
        dist.barrier()  # every rank's files are written before rank 0 renames the directory
        if consolidate:
            full_state = training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)
            if self._is_rank_zero:
                save_checkpoint_dir(self._checkpointer, tmp / "hf", model_state=full_state)
        if self._is_rank_zero:
            if consolidate:
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
            log.info(f"saved checkpoint {final}{' (with consolidated HF weights)' if consolidate else ''}")
        dist.barrier()

    def _load_checkpoint(self, checkpoint_dir: Path) -> None:
        state = load_recipe_state(checkpoint_dir)
        check_same_run(checkpoint_dir, state["run"], self._fingerprint)  # world_size included: DCP shards
        model_state, optim_state = get_state_dict(self._model, self._optimizer)
        shards = {"model": model_state, "optimizer": optim_state}
        dcp.load(shards, checkpoint_id=str(checkpoint_dir / "dcp"))
        set_state_dict(self._model, self._optimizer, model_state_dict=shards["model"],
                       optim_state_dict=shards["optimizer"])  # fmt: skip
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
    # NCCL for CUDA, gloo for CPU; nothing CUDA-only on the CPU path. A collective that waits longer than
    # collective_timeout_seconds fails instead of hanging; the default, 30 minutes, leaves time for rank 0 to write
    # a consolidated checkpoint of a large model while the others wait.
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=cfg.get("collective_timeout_seconds", 1800)))
    try:
        if dist.get_rank() == 0:
            config.log_config(recipe_name="FullDPORecipeDistributed", cfg=cfg)
        recipe = FullDPORecipeDistributed(cfg)
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
