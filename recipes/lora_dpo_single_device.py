"""LoRA / QLoRA / DoRA DPO on one device (CPU or one GPU).

    tune run recipes/lora_dpo_single_device.py --config recipe_configs/tiny/lora_dpo_single_device.yaml
    python recipes/lora_dpo_single_device.py --config recipe_configs/tiny/lora_dpo_single_device.yaml key=value

The policy is the base model plus LoRA adapters; the reference is the same base model with the adapters
disabled (no second copy of the weights), and is skipped entirely for reference-free losses. With
``reference.mode: precomputed`` its log-probs are computed once before training and cached on disk (keyed by
data, checkpoint, dtype and QLoRA), so the steps run no reference forward at all. Everything is
built from the YAML config: model (``quantize_base: true`` for QLoRA, ``use_dora: true`` for DoRA), tokenizer,
preference dataset, loss (any ``dpo_components.losses`` class; KTO on unpaired rows with
``dpo_components.data.unpaired_dataset``, ``recipe_configs/tiny/lora_kto_single_device.yaml``), optimizer (any torch
or torchao optimizer),
LR schedule and metric logger.

Features: fp32 / bf16; gradient accumulation (each micro-batch's mean loss is weighted by its share of the step's
pairs, so a step equals one big batch), with micro-batches of ``batch_size`` pairs or, with
``max_micro_batch_tokens: N``, of at most N computed tokens (``dpo_components.data.micro_batches``); activation
checkpointing; ``compile``; gradient clipping; chunked log-probs (no [2B, L, V] logits); metrics averaged over
the micro-batches of a step, every ``log_every_n_steps``; eval on held-out pairs every ``eval_every_n_steps`` and
at the end; checkpoints every ``save_every_n_steps`` and at the
end in Hugging Face layout (PEFT adapter + merged model), written atomically; exact resume from the latest
checkpoint (``resume_from_checkpoint: true``): data order and position, optimizer, LR schedule and RNG.
A NaN/inf loss or gradient stops the run before the optimizer step, keeping the last good checkpoint.
``eval_samples: N`` samples responses of the policy and the reference at every eval (text, true reward, KL;
``dpo_components.samples``); ``python -m dpo_components.tools.plot <output_dir>`` draws the run.

Speed switches (``benchmarks/README.md`` measures them; all but the second leave the numbers unchanged, the
second changes only which pairs share a batch):
``reference.mode: precomputed``; ``group_by_length: true`` (batches of similar length, less padding; the
``padding_fraction`` is logged); ``prefix_sharing: true`` (one [prompt | chosen | rejected] row per pair, the
prompt encoded once); ``packing: true`` (the batch's pairs end to end in a few rows of up to ``packing_row_tokens``,
no padding between them, no attention across pairs; the same pairs, so the numbers do not change);
``compile: true`` with ``pad_to_multiple_of`` (a few padded shapes, few recompiles).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torchtune import config, training, utils

from dpo_components.checkpointing import (
    check_same_run,
    checkpoint_fingerprint,
    load_peft_adapter,
    lora_settings,
    peft_layout,
    prepare_output_dir,
    restore_training_state,
    run_fingerprint,
    save_failed,
    save_lora_checkpoint,
    training_state,
)
from dpo_components.data.order import batch_order
from dpo_components.data.recipe_data import load_recipe_data
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.models.builders import lora_model
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


class LoRADPORecipeSingleDevice:
    def __init__(self, cfg: DictConfig) -> None:
        # every shared key, its default and its check: dpo_components.settings (the reference is adapters off)
        self.settings = RecipeSettings.from_config(cfg, reference_checkpointer=False)
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
        # Our resume reads our own checkpoints; torchtune's checkpointer only loads the base weights.
        self._checkpointer = config.instantiate(cfg.checkpointer, resume_from_checkpoint=False)
        adapter = load_peft_adapter(resume_dir, **peft_layout(self._checkpointer)) if resume_dir else None
        self._model = lora_model(cfg.model, s, self._checkpointer.load_checkpoint()[training.MODEL_KEY], adapter)
        self._lora = lora_settings(cfg.model)
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._data = load_recipe_data(cfg, s, self._tokenizer, self._model.max_seq_len, loss=self._loss_fn)
        # what this run is trained with (config keys, data and base checkpoint hashes): a resume must match it
        self._fingerprint = run_fingerprint(cfg, self._data.train, seed=self.seed)
        if resume_dir is not None:  # checked before the long parts of setup (reference log-probs)
            check_same_run(resume_dir, checkpoint_fingerprint(resume_dir), self._fingerprint)
        # eval_samples: responses of policy and reference to held-out prompts, sampled at every eval
        self._sampling = eval_sampling(cfg, self._data.eval, self._tokenizer, self.seed)
        self._reference = build_reference(
            s, self._loss_fn, self._model, has_adapters=True, frozen_copy=None, datasets=self._data.splits(),
            collate_fn=self._data.collate, fingerprint=self._fingerprint, tokenizer=self._tokenizer,
        )  # fmt: skip

        self._steps_per_epoch = s.steps_per_epoch(len(self._data.train))
        self._total_steps = self._steps_per_epoch * s.epochs
        # what the optimizer steps: fp32 master copies of bf16 adapters (master_dtype), or the adapters themselves
        self._master = MasterWeights(self._model.named_parameters(), s.master_dtype, seed=self.seed)
        self._optimizer = config.instantiate(cfg.optimizer, self._master.params)
        self._lr_scheduler = config.instantiate(cfg.lr_scheduler, self._optimizer, num_training_steps=self._total_steps)
        self._master.check_optimizer(self._optimizer)  # refuses what cannot step them; warns on lost updates
        if resume_dir is not None:
            self._load_recipe_state(resume_dir)
        log.info(
            f"{len(self._data.train)} train pairs, {self._steps_per_epoch} steps/epoch x {s.epochs} epochs, "
            f"loss {self._loss_fn}, reference {self._reference.describe()}; the optimizer steps "
            f"{self._master.describe()}"
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
        """Loss, preference accuracy and margins on the held-out pairs (policy vs reference), and with
        ``eval_samples`` responses of policy and reference (adapters off): logged as eval/*."""
        self.progress.last_eval_step = self.progress.global_step
        return evaluate(self._model, partial(self._forward, split="eval"), self._data.eval, self._data.collate,
                        self.settings.batch_size, self.settings.device, step=self.progress.global_step,
                        metric_logger=self._metric_logger, sampling=self._sampling,
                        reference=self._reference.sampling_context)  # fmt: skip

    # ------------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``<output_dir>/step_<N>/``: merged HF model, PEFT adapter, and the state for an exact resume."""
        state = training_state(self.progress.counters(), self._optimizer, self._lr_scheduler, self._fingerprint,
                               master_weights=self._master)  # fmt: skip
        path = self.settings.output_dir / f"step_{self.progress.global_step}"
        try:
            save_lora_checkpoint(self._checkpointer, path, self._model, self._lora, self.settings.dtype, state)
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
    config.log_config(recipe_name="LoRADPORecipeSingleDevice", cfg=cfg)
    recipe = LoRADPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
