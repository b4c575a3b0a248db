"""IPO (and any other preference loss) on one device: full-parameter or LoRA, live or precomputed reference.

    tune run recipes/ipo_single_device.py --config recipe_configs/tiny/ipo_single_device.yaml
    python recipes/ipo_single_device.py --config recipe_configs/tiny/ipo_single_device.yaml key=value

IPO (Azar et al. 2023) regresses the log-ratio margin h = (pi_w - ref_w) - (pi_l - ref_l) onto the target
1/(2 tau) instead of pushing it to infinity, so it can train for several epochs without early stopping. The
default loss is ``IPOLoss`` on per-token averaged log-probs; the recipe logs IPO's own quantities
(``ipo/margin``, ``ipo/target``, ``ipo/abs_gap``) next to the reward metrics, for train and held-out pairs.

- Fine-tuning: the model component decides. A plain builder (``tiny_llama``, ``llama3_2_1b``) trains all
  parameters; a LoRA builder (``lora_*``/``qlora_*``) trains the adapters only.
- Reference (``reference.mode``):
  ``model``: kept in memory, evaluated every step: the base model with adapters off for LoRA, a frozen copy
  (eval mode, no grads) for full fine-tuning;
  ``precomputed``: one no-grad pass over the train and eval pairs before training, cached on disk under
  ``reference.cache_dir`` keyed by (tokenized data, reference checkpoint, dtype) and reused by later runs; then
  no reference model is kept. ``reference.checkpointer`` names a different reference checkpoint (e.g. an SFT
  model); by default the reference is the policy's starting point.
- Optimizers from YAML, torchao's low-bit ones included (``torchao.optim.AdamW8bit``, ``AdamW4bit``, ...), and
  quantized training of the full-parameter policy via ``model_transform`` (``dpo_components.quantization``:
  ``int8_mixed_precision``, ``int8_weight_only``, ``float8``).
- Eval every ``eval_every_n_steps`` and at the end (``eval_samples: N`` also samples policy and reference
  responses: text, true reward, KL); atomic HF-layout checkpoints every ``save_every_n_steps`` and
  at the end (full weights, or merged + PEFT adapter for LoRA); exact resume (``resume_from_checkpoint: true``);
  NaN/inf stop; gradient accumulation; clipping; activation checkpointing; ``compile``.
- Speed switches, as in the LoRA DPO recipe: ``group_by_length`` (similar lengths per batch) and
  ``prefix_sharing`` (one [prompt | chosen | rejected] row per pair, the prompt encoded once).
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torchtune import config, modules, training, utils
from torchtune.modules.peft import disable_adapter, get_adapter_params, set_trainable_params
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
    save_checkpoint_dir,
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
from dpo_components.quantization import plain_state_dict
from dpo_components.reference import (
    compute_reference_logprobs,
    load_or_compute,
    reference_cache_key,
    reference_for_batch,
    reference_variant,
)
from dpo_components.samples import adapters_off, eval_sampling, log_samples, same_model, sample_and_score
from dpo_components.training import (
    PreferenceMetrics,
    batch_order,
    collator_from_config,
    concatenated_logprobs,
    peak_memory_gib,
)

log = utils.get_logger("INFO")
REFERENCE_MODES = ("model", "precomputed")


class IPORecipeSingleDevice:
    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
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
        self._resume = cfg.get("resume_from_checkpoint", False)
        self._overwrite = cfg.get("overwrite_output_dir", False)
        self._reference_cfg = cfg.get("reference") or DictConfig({})
        self._reference_mode = self._reference_cfg.get("mode", "model")
        if self._reference_mode not in REFERENCE_MODES:
            raise ConfigError(f"reference.mode must be one of {REFERENCE_MODES}, got '{self._reference_mode}'")
        check_positive(cfg, "batch_size", "gradient_accumulation_steps", "epochs")
        check_step_counts(cfg)
        prepare_missing_inputs(cfg)  # the tiny configs build their model and data on first use
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
        claim_output_dir(self._output_dir, self._resume, self._overwrite)  # no mixing with an earlier run
        self._metric_logger = config.instantiate(cfg.metric_logger)
        self._metric_logger.log_config(cfg)
        remove_stale_temporaries(self._output_dir)  # what a killed or failed save left behind
        # the newest checkpoint whose files match its manifest (a corrupt newer one is skipped with a warning)
        resume_dir = resume_checkpoint(self._output_dir) if self._resume else None

        self._checkpointer = config.instantiate(cfg.checkpointer, resume_from_checkpoint=False)
        base_state = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
        self._model = self._build_model(cfg.model, base_state)
        self._is_lora = bool(get_adapter_params(self._model))
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._loss_fn = instantiate_loss(cfg.loss)
        self._train_data = config.instantiate(cfg.dataset, self._tokenizer)
        # what this run is trained with (config keys, data and checkpoint hashes): a resume must match it
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

        # The reference is built from the starting weights, before the policy loads a resumed state.
        self._setup_reference(cfg, base_state)
        del base_state
        if self._is_lora:
            self._lora = lora_settings(cfg.model)
            set_trainable_params(self._model, get_adapter_params(self._model))
        if resume_dir is not None:
            self._load_policy_weights(cfg, resume_dir)
        transform = optional_component(cfg, "model_transform")  # e.g. int8 / float8 training, full-parameter only
        if transform is not None:
            if self._is_lora:
                raise ConfigError("model_transform (int8/float8 training) applies to full-parameter training only")
            self._model = config.instantiate(transform, self._model)
        if cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(self._model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        if cfg.get("compile", False):
            training.compile_model(self._model)

        steps_per_epoch = len(self._train_data) // (self._batch_size * self._grad_accum)
        if self._max_steps_per_epoch is not None:
            steps_per_epoch = min(steps_per_epoch, self._max_steps_per_epoch)
        self._steps_per_epoch = steps_per_epoch
        self._total_steps = steps_per_epoch * self._total_epochs
        trainable = [p for p in self._model.parameters() if p.requires_grad]
        self._optimizer = config.instantiate(cfg.optimizer, trainable)
        self._lr_scheduler = config.instantiate(cfg.lr_scheduler, self._optimizer, num_training_steps=self._total_steps)
        if resume_dir is not None:
            self._load_recipe_state(resume_dir)
        log.info(
            f"{'LoRA' if self._is_lora else 'full-parameter'} training of {sum(p.numel() for p in trainable):,} "
            f"parameters; {len(self._train_data)} pairs, {steps_per_epoch} steps/epoch x {self._total_epochs} epochs; "
            f"loss {self._loss_fn}; reference {self._reference_mode}"
        )

    def _build_model(self, cfg_model: DictConfig, state: dict[str, Any]) -> torch.nn.Module:
        with training.set_default_dtype(self._dtype), self._device:
            model = unscale_dora_bias(config.instantiate(cfg_model))  # DoRA as exported
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lora_" not in k and "magnitude" not in k]:
            raise ConfigError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for module in model.modules():
            if hasattr(module, "initialize_dora_magnitude"):
                module.initialize_dora_magnitude()
        return model

    def _setup_reference(self, cfg: DictConfig, base_state: dict[str, Any]) -> None:
        """Set ``self._reference_model`` (mode model) or the cached log-probs (mode precomputed)."""
        self._reference_model, self._reference_cache = None, {}
        if not self._loss_fn.needs_reference:
            return
        ref_cfg = self._reference_cfg
        reference_digest = self._fingerprint.get("reference_checkpoint", self._fingerprint["base_checkpoint"])
        cache_files = {}
        if self._reference_mode == "precomputed":
            cache_dir = Path(ref_cfg.get("cache_dir") or self._output_dir / "reference_cache")
            variant = reference_variant(cfg)
            for split, data in (("train", self._train_data), ("eval", self._eval_data)):
                if data is not None:
                    key = reference_cache_key(data, reference_digest, self._dtype, variant)
                    cache_files[split] = cache_dir / f"reference_logps_{key}.safetensors"
            if all(path.is_file() for path in cache_files.values()):  # nothing to compute: build no reference
                for split, path in cache_files.items():
                    self._reference_cache[split] = load_or_compute(path, None)
                    log.info(f"reference log-probs for {split}: reused {path}")
                return

        if ref_cfg.get("checkpointer"):
            ref_checkpointer = config.instantiate(ref_cfg.checkpointer, resume_from_checkpoint=False)
            reference = self._frozen_copy(cfg.model, ref_checkpointer.load_checkpoint()[training.MODEL_KEY])
        else:
            # LoRA: the base model with adapters off is the reference, no copy needed.
            reference = None if self._is_lora else self._frozen_copy(cfg.model, base_state)
        if self._reference_mode == "model":
            self._reference_model = reference
            return
        batch_size = ref_cfg.get("batch_size", self._batch_size)
        for split, path in cache_files.items():
            data = self._train_data if split == "train" else self._eval_data
            reused = path.is_file()
            self._reference_cache[split] = load_or_compute(path, partial(self._reference_pass, reference, data,
                                                                         batch_size))  # fmt: skip
            log.info(f"reference log-probs for {split}: {'reused' if reused else 'computed'} {path}")
        del reference  # no reference weights are kept in precomputed mode

    @torch.no_grad()
    def _reference_pass(self, reference: torch.nn.Module | None, data, batch_size: int) -> dict[str, torch.Tensor]:
        with self._reference_context(reference):
            model = reference if reference is not None else self._model
            return compute_reference_logprobs(model, data, self._collate, batch_size, self._device, self._chunk_size)

    def _frozen_copy(self, cfg_model: DictConfig, state: dict[str, Any]) -> torch.nn.Module:
        model = self._build_model(cfg_model, state)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        return model

    def _reference_context(self, reference: torch.nn.Module | None):
        """Adapters off when the policy itself serves as the reference (LoRA)."""
        return disable_adapter(self._model) if reference is None else nullcontext()

    def _load_policy_weights(self, cfg: DictConfig, checkpoint_dir: Path) -> None:
        if self._is_lora:
            adapter = load_peft_adapter(checkpoint_dir, **peft_layout(self._checkpointer))
            _, unexpected = self._model.load_state_dict(adapter, strict=False)
        else:
            files = sorted(p.name for p in checkpoint_dir.glob("model-*.safetensors"))
            checkpointer = config.instantiate(cfg.checkpointer, checkpoint_dir=str(checkpoint_dir),
                                              checkpoint_files=files, resume_from_checkpoint=False)  # fmt: skip
            _, unexpected = self._model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY])
        if unexpected:
            raise ConfigError(f"{checkpoint_dir} does not fit the model: unexpected keys {unexpected[:5]}")

    # -------------------------------------------------------------------------------------------- the step

    def _forward(self, batch: dict[str, torch.Tensor], split: str):
        batch = {k: v.to(self._device) for k, v in batch.items()}
        policy = concatenated_logprobs(self._model, batch, self._chunk_size)
        reference = None
        if self._loss_fn.needs_reference:
            if self._reference_mode == "precomputed":
                reference = reference_for_batch(self._reference_cache[split], batch["index"].cpu(), self._device)
            else:
                with torch.no_grad(), self._reference_context(self._reference_model):
                    model = self._reference_model if self._reference_model is not None else self._model
                    reference = concatenated_logprobs(model, batch, self._chunk_size)
        return self._loss_fn(policy, reference), policy

    def train(self) -> None:
        metrics, interval_start = PreferenceMetrics(), time.perf_counter()
        trainable = [p for p in self._model.parameters() if p.requires_grad]
        progress = tqdm(total=self._total_steps, initial=self.global_step, desc="IPO", dynamic_ncols=True)
        for epoch in range(self.epochs_run, self._total_epochs):
            order = batch_order(self._train_data, self.seed, epoch, self._batch_size, self._shuffle,
                                self._group_by_length, self._prefix_sharing)  # fmt: skip
            loader = DataLoader(self._train_data, batch_size=self._batch_size, collate_fn=self._collate,
                                sampler=order[self._batches_done_in_epoch * self._batch_size :], drop_last=True,
                                generator=torch.Generator())  # fmt: skip
            self._model.train()
            for batch in loader:
                if self._batches_done_in_epoch // self._grad_accum >= self._steps_per_epoch:
                    break
                out, policy = self._forward(batch, "train")
                loss = out.losses.mean()
                if not torch.isfinite(loss):
                    self._stop_on_nonfinite("loss", loss.item())
                (loss / self._grad_accum).backward()
                metrics.update(out, policy, batch)
                self._batches_done_in_epoch += 1
                if self._batches_done_in_epoch % self._grad_accum:
                    continue

                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm=float(self._clip_grad_norm or math.inf))
                if not torch.isfinite(grad_norm):
                    self._stop_on_nonfinite("gradient norm", grad_norm.item())
                self._optimizer.step()
                self._optimizer.zero_grad(set_to_none=True)
                self._lr_scheduler.step()
                self.global_step += 1
                progress.update(1)

                if self.global_step % self._log_every == 0:
                    logged = metrics.compute()
                    logged.update(lr=self._optimizer.param_groups[0]["lr"], grad_norm=grad_norm.item(),
                                  tokens_per_second=metrics.tokens / (time.perf_counter() - interval_start),
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
        raise FloatingPointError(
            f"the {what} is {value} at step {self.global_step + 1}; stopping before the optimizer step. "
            f"Last good checkpoint: {self._last_checkpoint or 'none saved yet'}. Lower the learning rate, use fp32 "
            "or set clip_grad_norm."
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, accuracy, margins and IPO's margin vs target on the held-out pairs, logged as eval/*."""
        was_training = self._model.training
        self._model.eval()
        metrics = PreferenceMetrics()
        loader = DataLoader(self._eval_data, batch_size=self._batch_size, collate_fn=self._collate,
                            generator=torch.Generator())  # fmt: skip
        for batch in loader:
            metrics.update(*self._forward(batch, "eval"))
        results = {f"eval/{name}": value for name, value in metrics.compute().items()}
        if self._samples:
            sampled, rows = sample_and_score(self._model, self._sample_reference(), self._sample_prompts,
                                             self._tokenizer, self._samples, self.seed)  # fmt: skip
            results.update(sampled)
            log_samples(self._metric_logger, rows, self.global_step)
        self._metric_logger.log_dict(results, step=self.global_step)
        self._last_eval_step = self.global_step
        summary = ", ".join(f"{k.removeprefix('eval/')} {results[k]:.4f}" for k in
                            ("eval/loss", "eval/rewards/accuracies", "eval/ipo/margin", "eval/ipo/target")
                            if k in results)  # fmt: skip
        log.info(f"step {self.global_step} eval: {summary}")
        self._model.train(was_training)
        return results

    def _sample_reference(self):
        """The reference to sample from at eval: adapters off (LoRA), the frozen copy, or none (a precomputed
        reference of a full fine-tune keeps no model: then policy samples only, and no KL)."""
        if self._is_lora:
            return partial(adapters_off, self._model)
        return partial(same_model, self._reference_model) if self._reference_model is not None else None

    # ------------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """``<output_dir>/step_<N>/``: HF-layout weights (merged + PEFT adapter for LoRA) and the resume state."""
        state = training_state(self._progress(), self._optimizer, self._lr_scheduler, self._fingerprint)
        path = self._output_dir / f"step_{self.global_step}"
        try:
            if self._is_lora:
                save_lora_checkpoint(self._checkpointer, path, self._model, self._lora, self._dtype, state)
            else:
                save_checkpoint_dir(self._checkpointer, path, model_state=plain_state_dict(self._model),
                                    recipe_state=state)  # fmt: skip
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
    config.log_config(recipe_name="IPORecipeSingleDevice", cfg=cfg)
    recipe = IPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
