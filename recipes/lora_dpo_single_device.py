"""LoRA / QLoRA / DoRA DPO on one device (CPU or one GPU).

    tune run recipes/lora_dpo_single_device.py --config recipe_configs/tiny/lora_dpo_single_device.yaml
    python recipes/lora_dpo_single_device.py --config recipe_configs/tiny/lora_dpo_single_device.yaml key=value

The policy is the base model plus LoRA adapters; the reference is the same base model with the adapters
disabled (no second copy of the weights), and is skipped entirely for reference-free losses. With
``reference.mode: precomputed`` its log-probs are computed once before training and cached on disk (keyed by
data, checkpoint, dtype and QLoRA), so the steps run no reference forward at all. Everything is
built from the YAML config: model (``quantize_base: true`` for QLoRA, ``use_dora: true`` for DoRA), tokenizer,
preference dataset, loss (any ``dpo_components.losses`` class), optimizer (any torch or torchao optimizer),
LR schedule and metric logger.

Features: fp32 / bf16; gradient accumulation (each micro-batch loss is divided by the number of micro-batches,
so a step equals one big batch); activation checkpointing; ``compile``; gradient clipping; chunked log-probs
(no [2B, L, V] logits); metrics averaged over the micro-batches of a step, every ``log_every_n_steps``; eval on
held-out pairs every ``eval_every_n_steps`` and at the end; checkpoints every ``save_every_n_steps`` and at the
end in Hugging Face layout (PEFT adapter + merged model), written atomically; exact resume from the latest
checkpoint (``resume_from_checkpoint: true``): data order and position, optimizer, LR schedule and RNG.
A NaN/inf loss or gradient stops the run before the optimizer step, keeping the last good checkpoint.
``eval_samples: N`` samples responses of the policy and the reference at every eval (text, true reward, KL;
``dpo_components.samples``); ``python -m dpo_components.plot <output_dir>`` draws the run.

Speed switches (``benchmarks/README.md`` measures them; the first and third leave the numbers unchanged, the
second changes only which pairs share a batch):
``reference.mode: precomputed``; ``group_by_length: true`` (batches of similar length, less padding; the
``padding_fraction`` is logged); ``prefix_sharing: true`` (one [prompt | chosen | rejected] row per pair, the
prompt encoded once); ``compile: true`` with ``pad_to_multiple_of`` (a few padded shapes, few recompiles).
"""

from __future__ import annotations

import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torchtune import config, modules, training, utils
from torchtune.modules.peft import (
    disable_adapter,
    get_adapter_params,
    set_trainable_params,
    validate_missing_and_unexpected_for_lora,
)
from tqdm import tqdm

from dpo_components.checkpointing import (
    check_same_run,
    checkpoint_fingerprint,
    claim_output_dir,
    load_peft_adapter,
    lora_settings,
    peft_layout,
    remove_stale_temporaries,
    restore_training_state,
    resume_checkpoint,
    run_fingerprint,
    save_failed,
    save_lora_checkpoint,
    training_state,
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
from dpo_components.models import unscale_dora_bias
from dpo_components.reference import (
    compute_reference_logprobs,
    load_or_compute,
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
)

log = utils.get_logger("INFO")


class LoRADPORecipeSingleDevice:
    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)  # refuses bf16 where unsupported
        if self._dtype == torch.float16:
            raise ConfigError("dtype fp16 is not supported (no loss scaling); use bf16 or fp32")
        self._output_dir = Path(cfg.output_dir)
        self.seed = training.set_seed(cfg.seed)
        self._batch_size = cfg.batch_size
        self._grad_accum = cfg.gradient_accumulation_steps
        self._total_epochs = cfg.epochs
        self._max_steps_per_epoch = cfg.get("max_steps_per_epoch")
        self._clip_grad_norm = cfg.get("clip_grad_norm")
        self._chunk_size = cfg.get("logprob_chunk_size", 256)
        self._log_every = cfg.get("log_every_n_steps", 1)
        self._eval_every = cfg.get("eval_every_n_steps")
        self._save_every = cfg.get("save_every_n_steps")
        self._shuffle = cfg.get("shuffle", True)
        self._group_by_length = cfg.get("group_by_length", False)
        self._prefix_sharing = cfg.get("prefix_sharing", False)
        if self._group_by_length and not self._shuffle:
            raise ConfigError("group_by_length: true needs shuffle: true (the groups are drawn from a shuffled order)")
        self._reference_cfg = cfg.get("reference") or {}
        self._reference_mode = self._reference_cfg.get("mode", "model")
        if self._reference_mode not in ("model", "precomputed"):
            raise ConfigError(f"reference.mode must be 'model' or 'precomputed', not {self._reference_mode!r}")
        self._resume = cfg.get("resume_from_checkpoint", False)
        self._overwrite = cfg.get("overwrite_output_dir", False)
        check_positive(cfg, "batch_size", "gradient_accumulation_steps", "epochs")
        check_step_counts(cfg)
        prepare_missing_inputs(cfg)  # the tiny configs build their model and data on first use
        check_checkpoint_paths(cfg.checkpointer, cfg.output_dir)

        self.global_step = 0  # optimizer steps taken
        self.epochs_run = 0
        self._batches_done_in_epoch = 0  # micro-batches of the current epoch already trained on
        self._last_checkpoint: Path | None = None
        self._last_eval_step: int | None = None

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        claim_output_dir(self._output_dir, self._resume, self._overwrite)  # no mixing with an earlier run
        self._metric_logger = config.instantiate(cfg.metric_logger)
        self._metric_logger.log_config(cfg)

        remove_stale_temporaries(self._output_dir)  # what a killed or failed save left behind
        # the newest checkpoint whose files match its manifest (a corrupt newer one is skipped with a warning)
        resume_dir = resume_checkpoint(self._output_dir) if self._resume else None
        # Our resume reads our own checkpoints; torchtune's checkpointer only loads the base weights.
        self._checkpointer = config.instantiate(cfg.checkpointer, resume_from_checkpoint=False)
        base_state = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
        self._model = self._setup_model(cfg, base_state, resume_dir)
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._loss_fn = instantiate_loss(cfg.loss)

        self._train_data = config.instantiate(cfg.dataset, self._tokenizer)
        # what this run is trained with (config keys, data and base checkpoint hashes): a resume must match it
        self._fingerprint = run_fingerprint(cfg, self._train_data, seed=self.seed)
        if resume_dir is not None:  # checked before the long parts of setup (reference log-probs)
            check_same_run(resume_dir, checkpoint_fingerprint(resume_dir), self._fingerprint)
        eval_cfg = optional_component(cfg, "eval_dataset")
        self._eval_data = config.instantiate(eval_cfg, self._tokenizer) if eval_cfg else None
        if self._eval_every and self._eval_data is None:
            raise ConfigError("eval_every_n_steps is set but there is no eval_dataset")
        # eval_samples: responses of policy and reference to held-out prompts, sampled at every eval
        self._samples, self._sample_prompts = eval_sampling(cfg, self._eval_data)
        if len(self._train_data) < self._batch_size * self._grad_accum:
            raise ConfigError(
                f"the dataset has {len(self._train_data)} pairs, fewer than one step's "
                f"batch_size x gradient_accumulation_steps = {self._batch_size * self._grad_accum}"
            )
        self._collate = collator_from_config(cfg, self._tokenizer.pad_id, self._model.max_seq_len,
                                             dataset=self._train_data, eval_dataset=self._eval_data)  # fmt: skip
        self._reference_cache = self._setup_reference(cfg) if self._reference_mode == "precomputed" else {}

        steps_per_epoch = len(self._train_data) // (self._batch_size * self._grad_accum)
        if self._max_steps_per_epoch is not None:
            steps_per_epoch = min(steps_per_epoch, self._max_steps_per_epoch)
        self._steps_per_epoch = steps_per_epoch
        self._total_steps = steps_per_epoch * self._total_epochs

        self._optimizer = config.instantiate(cfg.optimizer, [p for p in self._model.parameters() if p.requires_grad])
        self._lr_scheduler = config.instantiate(cfg.lr_scheduler, self._optimizer, num_training_steps=self._total_steps)
        if resume_dir is not None:
            self._load_recipe_state(resume_dir)
        reference = "none"
        if self._loss_fn.needs_reference:
            reference = "precomputed (cached)" if self._reference_cache else "base model, adapters off"
        log.info(
            f"{len(self._train_data)} train pairs, {steps_per_epoch} steps/epoch x {self._total_epochs} epochs, "
            f"loss {self._loss_fn}, reference {reference}"
        )

    def _setup_model(self, cfg: DictConfig, base_state: dict[str, Any], resume_dir: Path | None) -> torch.nn.Module:
        with training.set_default_dtype(self._dtype), self._device:
            model = unscale_dora_bias(config.instantiate(cfg.model))  # DoRA as exported
        self._lora = lora_settings(cfg.model)
        set_trainable_params(model, get_adapter_params(model))
        if cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})

        base_missing, base_unexpected = model.load_state_dict(base_state, strict=False)
        lora_missing = lora_unexpected = None
        if resume_dir is not None:
            adapter = load_peft_adapter(resume_dir, **peft_layout(self._checkpointer))
            lora_missing, lora_unexpected = model.load_state_dict(adapter, strict=False)
        elif self._lora["dora"]:
            for module in model.modules():
                if hasattr(module, "initialize_dora_magnitude"):
                    module.initialize_dora_magnitude()
        validate_missing_and_unexpected_for_lora(
            lora_attn_modules=self._lora["attn_modules"], apply_lora_to_mlp=self._lora["mlp"],
            apply_lora_to_output=self._lora["output"], base_missing=base_missing, base_unexpected=base_unexpected,
            lora_missing=lora_missing, lora_unexpected=lora_unexpected,
        )  # fmt: skip
        if cfg.get("compile", False):
            training.compile_model(model)  # per layer; padded lengths vary, see pad_to_multiple_of
        return model

    def _setup_reference(self, cfg: DictConfig) -> dict[str, dict[str, torch.Tensor]]:
        """Reference log-probs of every train and eval pair: read from the cache, or one no-grad pass of the
        base model (adapters off) written to it."""
        if not self._loss_fn.needs_reference:
            return {}
        cache_dir = Path(self._reference_cfg.get("cache_dir") or self._output_dir / "reference_cache")
        batch_size = self._reference_cfg.get("batch_size", self._batch_size)
        cache = {}
        for split, data in (("train", self._train_data), ("eval", self._eval_data)):
            if data is None:
                continue
            key = reference_cache_key(data, self._fingerprint["base_checkpoint"], self._dtype, reference_variant(cfg))
            path = cache_dir / f"reference_logps_{key}.safetensors"
            reused = path.is_file()
            cache[split] = load_or_compute(path, partial(self._reference_pass, data, batch_size))
            log.info(f"reference log-probs for {split}: {'reused' if reused else 'computed'} {path}")
        return cache

    @torch.no_grad()
    def _reference_pass(self, data, batch_size: int) -> dict[str, torch.Tensor]:
        with disable_adapter(self._model):
            return compute_reference_logprobs(self._model, data, self._collate, batch_size, self._device,
                                              self._chunk_size)  # fmt: skip

    # -------------------------------------------------------------------------------------------- the step

    def _forward(self, batch: dict[str, torch.Tensor], split: str = "train"):
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
        progress = tqdm(total=self._total_steps, initial=self.global_step, desc="DPO", dynamic_ncols=True)
        for epoch in range(self.epochs_run, self._total_epochs):
            order = batch_order(self._train_data, self.seed, epoch, self._batch_size, self._shuffle,
                                self._group_by_length, self._prefix_sharing)  # fmt: skip
            loader = DataLoader(
                self._train_data,
                batch_size=self._batch_size,
                sampler=order[self._batches_done_in_epoch * self._batch_size :],
                collate_fn=self._collate,
                drop_last=True,
                generator=torch.Generator(),  # not the global RNG: a resumed run must draw the same dropout masks
            )
            self._model.train()
            for batch in loader:
                if self._batches_done_in_epoch // self._grad_accum >= self._steps_per_epoch:
                    break
                out, policy = self._forward(batch)
                loss = out.losses.mean()
                if not torch.isfinite(loss):
                    self._stop_on_nonfinite("loss", loss.item())
                (loss / self._grad_accum).backward()
                metrics.update(out, policy, batch)
                self._batches_done_in_epoch += 1
                if self._batches_done_in_epoch % self._grad_accum:
                    continue

                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self._model.parameters() if p.requires_grad],
                    max_norm=float(self._clip_grad_norm or math.inf),
                )
                if not torch.isfinite(grad_norm):
                    self._stop_on_nonfinite("gradient norm", grad_norm.item())
                self._optimizer.step()
                self._optimizer.zero_grad(set_to_none=True)
                self._lr_scheduler.step()
                self.global_step += 1
                progress.update(1)

                if self.global_step % self._log_every == 0:
                    seconds = time.perf_counter() - interval_start
                    logged = metrics.compute()
                    logged.update(lr=self._optimizer.param_groups[0]["lr"], grad_norm=grad_norm.item(),
                                  tokens_per_second=metrics.tokens / seconds,
                                  peak_memory_gib=peak_memory_gib(self._device))  # fmt: skip
                    self._metric_logger.log_dict(logged, step=self.global_step)
                    progress.set_postfix(loss=f"{logged['loss']:.4f}", acc=f"{logged['rewards/accuracies']:.2f}")
                    metrics, interval_start = PreferenceMetrics(), time.perf_counter()
                if self._eval_every and self.global_step % self._eval_every == 0:
                    self.evaluate()
                if self._save_every and self.global_step % self._save_every == 0:
                    self.save_checkpoint()
            self.epochs_run, self._batches_done_in_epoch = epoch + 1, 0
        progress.close()
        if self._eval_data is not None and self._last_eval_step != self.global_step:
            self.evaluate()
        if self._last_checkpoint is None or self._last_checkpoint.name != f"step_{self.global_step}":
            self.save_checkpoint()

    def _stop_on_nonfinite(self, what: str, value: float) -> None:
        last = self._last_checkpoint or "none saved yet"
        raise FloatingPointError(
            f"the {what} is {value} at step {self.global_step + 1}; stopping before the optimizer step. "
            f"Last good checkpoint: {last}. Lower the learning rate, use fp32 or set clip_grad_norm."
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, preference accuracy and margins on the held-out pairs (policy vs reference), logged as eval/*."""
        was_training = self._model.training
        self._model.eval()
        metrics = PreferenceMetrics()
        loader = DataLoader(self._eval_data, batch_size=self._batch_size, collate_fn=self._collate,
                            generator=torch.Generator())  # fmt: skip
        for batch in loader:
            out, policy = self._forward(batch, "eval")
            metrics.update(out, policy)
        results = {f"eval/{name}": value for name, value in metrics.compute().items()}
        if self._samples:  # the reference is the base model: adapters off
            sampled, rows = sample_and_score(self._model, partial(adapters_off, self._model), self._sample_prompts,
                                             self._tokenizer, self._samples, self.seed)  # fmt: skip
            results.update(sampled)
            log_samples(self._metric_logger, rows, self.global_step)
        self._metric_logger.log_dict(results, step=self.global_step)
        self._last_eval_step = self.global_step
        log.info(
            f"step {self.global_step} eval: loss {results['eval/loss']:.4f}, accuracy "
            f"{results['eval/rewards/accuracies']:.3f}, margin {results['eval/rewards/margins']:.4f}"
        )
        self._model.train(was_training)
        return results

    # ------------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``<output_dir>/step_<N>/``: merged HF model, PEFT adapter, and the state for an exact resume."""
        state = training_state(self._progress(), self._optimizer, self._lr_scheduler, self._fingerprint)
        path = self._output_dir / f"step_{self.global_step}"
        try:
            save_lora_checkpoint(self._checkpointer, path, self._model, self._lora, self._dtype, state)
        except Exception as error:  # disk full, read-only, ...: one message naming the path and the last good one
            raise save_failed(path, error, self._last_checkpoint) from None
        self._last_checkpoint = path
        log.info(f"saved checkpoint {path}")
        return path

    def _progress(self) -> dict[str, int]:
        return {"global_step": self.global_step, "epochs_run": self.epochs_run,
                "batches_done_in_epoch": self._batches_done_in_epoch}  # fmt: skip

    def _load_recipe_state(self, checkpoint_dir: Path) -> None:
        progress = restore_training_state(checkpoint_dir, self._optimizer, self._lr_scheduler, self._fingerprint)
        self.global_step = progress["global_step"]
        self.epochs_run = progress["epochs_run"]
        self._batches_done_in_epoch = progress["batches_done_in_epoch"]
        self._last_checkpoint = checkpoint_dir
        log.info(f"resumed from {checkpoint_dir} at step {self.global_step}")

    def cleanup(self) -> None:
        self._metric_logger.close()
        log.info(f"plot this run: python -m dpo_components.plot {self._output_dir}")


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="LoRADPORecipeSingleDevice", cfg=cfg)
    recipe = LoRADPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
