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
  quantized training of the full-parameter policy via ``model_transform`` (``dpo_components.models.quantization``:
  ``int8_mixed_precision``, ``int8_weight_only``, ``float8``).
- Eval every ``eval_every_n_steps`` and at the end (``eval_samples: N`` also samples policy and reference
  responses: text, true reward, KL); atomic HF-layout checkpoints every ``save_every_n_steps`` and
  at the end (full weights, or merged + PEFT adapter for LoRA); exact resume (``resume_from_checkpoint: true``);
  NaN/inf stop; gradient accumulation; clipping; activation checkpointing; ``compile``.
- Speed switches, as in the LoRA DPO recipe: ``group_by_length`` (similar lengths per batch),
  ``prefix_sharing`` (one [prompt | chosen | rejected] row per pair, the prompt encoded once) and ``packing``
  (the batch's pairs end to end in a few rows, no padding between them; the same pairs and losses);
  ``max_micro_batch_tokens`` (the step's pairs in micro-batches of at most that many computed tokens).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torchtune import config, training, utils
from torchtune.modules.peft import get_adapter_params

from dpo_components.checkpointing import (
    check_same_run,
    checkpoint_fingerprint,
    lora_settings,
    prepare_output_dir,
    restore_training_state,
    run_fingerprint,
    save_checkpoint_dir,
    save_failed,
    save_lora_checkpoint,
    training_state,
)
from dpo_components.data.order import batch_order
from dpo_components.data.recipe_data import load_recipe_data
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.models.builders import full_or_lora_model, trainable_policy
from dpo_components.models.quantization import plain_state_dict
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


class IPORecipeSingleDevice:
    def __init__(self, cfg: DictConfig) -> None:
        self.settings = RecipeSettings.from_config(cfg)  # every shared key, its default and its check
        self.seed = training.set_seed(self.settings.seed)
        prepare_and_check_inputs(cfg)  # the tiny configs build their model and data on first use
        self.progress = RunProgress()  # steps taken, position in the data, last checkpoint (dpo_components.run)

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        s = self.settings
        self._loss_fn = instantiate_loss(cfg.loss, s)  # first: a loss the settings refuse stops here
        # no mixing with an earlier run; leftovers of killed saves removed; the newest complete checkpoint
        resume_dir = prepare_output_dir(s.output_dir, s.resume, s.overwrite_output_dir)
        self._metric_logger = start_metric_logger(cfg.metric_logger, cfg)  # None on ranks > 0
        self._checkpointer = config.instantiate(cfg.checkpointer, resume_from_checkpoint=False)
        base_state = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
        self._model = full_or_lora_model(cfg.model, s, base_state)  # a LoRA builder: LoRA; else every parameter
        self._is_lora = bool(get_adapter_params(self._model))
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._data = load_recipe_data(cfg, s, self._tokenizer, self._model.max_seq_len, loss=self._loss_fn)
        # what this run is trained with (config keys, data and checkpoint hashes): a resume must match it
        self._fingerprint = run_fingerprint(cfg, self._data.train, seed=self.seed)
        if resume_dir is not None:  # checked before the long parts of setup (reference log-probs)
            check_same_run(resume_dir, checkpoint_fingerprint(resume_dir), self._fingerprint)
        # eval_samples: responses of policy and reference to held-out prompts, sampled at every eval
        self._sampling = eval_sampling(cfg, self._data.eval, self._tokenizer, self.seed)
        # The reference is built from the starting weights, before the policy loads a resumed state: the policy with
        # adapters off (LoRA), else a frozen copy of the start or of reference.checkpointer; or precomputed.
        self._reference = build_reference(
            s, self._loss_fn, self._model, has_adapters=self._is_lora,
            frozen_copy=partial(self._frozen_copy, cfg.model, base_state), datasets=self._data.splits(),
            collate_fn=self._data.collate, fingerprint=self._fingerprint, tokenizer=self._tokenizer,
        )  # fmt: skip
        del base_state
        # LoRA: only the adapters train; a resumed checkpoint's weights; model_transform (int8 / float8 training)
        self._model = trainable_policy(self._model, cfg, s, self._checkpointer, resume_dir)
        self._lora = lora_settings(cfg.model) if self._is_lora else None

        self._steps_per_epoch = s.steps_per_epoch(len(self._data.train))
        self._total_steps = self._steps_per_epoch * s.epochs
        # what the optimizer steps: fp32 master copies of bf16 weights (master_dtype), or the weights themselves
        self._master = MasterWeights(self._model.named_parameters(), s.master_dtype, seed=self.seed)
        self._optimizer = config.instantiate(cfg.optimizer, self._master.params)
        self._lr_scheduler = config.instantiate(cfg.lr_scheduler, self._optimizer, num_training_steps=self._total_steps)
        self._master.check_optimizer(self._optimizer)  # refuses what cannot step them; warns on lost updates
        if resume_dir is not None:
            self._load_recipe_state(resume_dir)
        log.info(
            f"{'LoRA' if self._is_lora else 'full-parameter'} training of {len(self._master):,} parameters "
            f"({self._master.describe()}); {len(self._data.train)} pairs, {self._steps_per_epoch} steps/epoch x "
            f"{s.epochs} epochs; loss {self._loss_fn}; reference {self._reference.describe()}"
        )

    def _frozen_copy(self, cfg_model: DictConfig, start: dict[str, Any], ckpt: DictConfig | None) -> torch.nn.Module:
        """A reference model in eval mode without grads: the starting weights, or ``reference.checkpointer``'s."""
        if ckpt is not None:
            start = config.instantiate(ckpt, resume_from_checkpoint=False).load_checkpoint()[training.MODEL_KEY]
        return full_or_lora_model(cfg_model, self.settings, start).eval().requires_grad_(False)

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
            order = batch_order(self._data.train, self.seed, epoch, s.batch_size, s.shuffle, s.group_by_length,
                                s.prefix_sharing)  # fmt: skip
            # one step's pairs at a time, split into micro-batches below
            loader = DataLoader(self._data.train, batch_size=s.batch_size * s.gradient_accumulation_steps,
                                collate_fn=list, sampler=order[progress.batches_done_in_epoch * s.batch_size :],
                                drop_last=True, generator=torch.Generator())  # not the global RNG (dropout masks)
            self._model.train()
            for samples in loader:
                if progress.batches_done_in_epoch // s.gradient_accumulation_steps >= self._steps_per_epoch:
                    break
                # gradient_accumulation_steps micro-batches of batch_size pairs, or by max_micro_batch_tokens
                for members in self._data.micro_batches(samples):
                    batch = self._data.collate([samples[i] for i in members])
                    out, policy = self._forward(batch, "train")
                    # weighted by its share of the step's pairs: the step's loss is the mean over all of them
                    (out.losses.mean() / (len(samples) / len(members))).backward()
                    self._master.accumulate_grads()  # into the fp32 master gradients (no-op without master copies)
                    step_log.update(out, policy, batch)
                progress.batches_done_in_epoch += s.gradient_accumulation_steps

                grad_norm = clip_gradients(self._master.params, s.clip_grad_norm)
                logged = step_log.step_metrics()
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
                if due(progress.global_step, s.save_every_n_steps):
                    self.save_checkpoint()
            progress.next_epoch(epoch)
        step_log.close()
        if progress.needs_final_eval(self._data.eval is not None):
            self.evaluate()
        if progress.needs_final_save():
            self.save_checkpoint()

    def evaluate(self) -> dict[str, float]:
        """Loss, accuracy, margins and the loss's own metrics (IPO's margin vs target) on the held-out pairs, and
        with ``eval_samples`` responses of policy and reference: logged as eval/*."""
        self.progress.last_eval_step = self.progress.global_step
        return evaluate(self._model, partial(self._forward, split="eval"), self._data.eval, self._data.collate,
                        self.settings.batch_size, self.settings.device, step=self.progress.global_step,
                        metric_logger=self._metric_logger, sampling=self._sampling,
                        reference=self._reference.sampling_context)  # fmt: skip

    # ------------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """``<output_dir>/step_<N>/``: HF-layout weights (merged + PEFT adapter for LoRA) and the resume state."""
        state = training_state(self.progress.counters(), self._optimizer, self._lr_scheduler, self._fingerprint,
                               master_weights=self._master)  # fmt: skip
        path = self.settings.output_dir / f"step_{self.progress.global_step}"
        try:
            if self._is_lora:
                save_lora_checkpoint(self._checkpointer, path, self._model, self._lora, self.settings.dtype, state)
            else:
                save_checkpoint_dir(self._checkpointer, path, model_state=plain_state_dict(self._model),
                                    recipe_state=state)  # fmt: skip
        except Exception as error:  # disk full, read-only, ...: one message naming the path and the last good one
            raise save_failed(path, error, self.progress.last_checkpoint) from None
        self.progress.saved(path)
        return path

    def _load_recipe_state(self, checkpoint_dir: Path) -> None:
        counters = restore_training_state(checkpoint_dir, self._optimizer, self._lr_scheduler, self._fingerprint,
                                          master_weights=self._master)  # fmt: skip
        self.progress.resume(counters, checkpoint_dir)

    def cleanup(self) -> None:
        close_metric_logger(self._metric_logger, self.settings.output_dir)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="IPORecipeSingleDevice", cfg=cfg)
    recipe = IPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
