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

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torchtune import config, modules, training, utils
from torchtune.modules.peft import get_adapter_params, set_trainable_params, validate_missing_and_unexpected_for_lora
from tqdm import tqdm

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
from dpo_components.metrics import PreferenceMetrics, ZeroGradientWatch, peak_memory_gib
from dpo_components.models import apply_model_fixes
from dpo_components.models.quantization import nf4_estimate
from dpo_components.precision import MasterWeights
from dpo_components.reference import build_reference, reference_variant
from dpo_components.samples import eval_sampling, log_samples, sample_and_score
from dpo_components.settings import RecipeSettings, instantiate_loss, prepare_and_check_inputs

log = utils.get_logger("INFO")


class LoRADPORecipeSingleDevice:
    def __init__(self, cfg: DictConfig) -> None:
        # every shared key, its default and its check: dpo_components.settings (the reference is adapters off)
        self.settings = RecipeSettings.from_config(cfg, reference_checkpointer=False)
        self.seed = training.set_seed(self.settings.seed)
        prepare_and_check_inputs(cfg)  # the tiny configs build their model and data on first use
        self.global_step = 0  # optimizer steps taken
        self.epochs_run = 0
        self._batches_done_in_epoch = 0  # of the epoch, in batch_size units: steps done x gradient_accumulation_steps
        self._last_checkpoint: Path | None = None
        self._last_eval_step: int | None = None

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        s = self.settings
        self._loss_fn = instantiate_loss(cfg.loss, s)  # first: a loss the settings refuse stops here
        # no mixing with an earlier run; leftovers of killed saves removed; the newest complete checkpoint
        resume_dir = prepare_output_dir(s.output_dir, s.resume, s.overwrite_output_dir)
        self._metric_logger = config.instantiate(cfg.metric_logger)
        self._metric_logger.log_config(cfg)
        # Our resume reads our own checkpoints; torchtune's checkpointer only loads the base weights.
        self._checkpointer = config.instantiate(cfg.checkpointer, resume_from_checkpoint=False)
        base_state = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
        self._model = self._setup_model(cfg, base_state, resume_dir)
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._data = load_recipe_data(cfg, s, self._tokenizer, self._model.max_seq_len, loss=self._loss_fn)
        # what this run is trained with (config keys, data and base checkpoint hashes): a resume must match it
        self._fingerprint = run_fingerprint(cfg, self._data.train, seed=self.seed)
        if resume_dir is not None:  # checked before the long parts of setup (reference log-probs)
            check_same_run(resume_dir, checkpoint_fingerprint(resume_dir), self._fingerprint)
        # eval_samples: responses of policy and reference to held-out prompts, sampled at every eval
        self._samples, self._sample_prompts = eval_sampling(cfg, self._data.eval)
        self._reference = build_reference(
            s, self._loss_fn, self._model, has_adapters=True, frozen_copy=None, datasets=self._data.splits(),
            collate_fn=self._data.collate, fingerprint=self._fingerprint, variant=reference_variant(cfg),
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

    def _setup_model(self, cfg: DictConfig, base_state: dict[str, Any], resume_dir: Path | None) -> torch.nn.Module:
        start, qlora = time.perf_counter(), cfg.model.get("quantize_base", False)
        if qlora:  # torchtune quantizes each base linear twice: at build (the random init) and when the weights load
            log.info(f"QLoRA: quantizing the base linears to NF4 {nf4_estimate(base_state, self.settings.device)} ...")
        with training.set_default_dtype(self.settings.dtype), self.settings.device:
            model = apply_model_fixes(config.instantiate(cfg.model))  # DoRA as exported, fused RMSNorm
        self._lora = lora_settings(cfg.model)
        set_trainable_params(model, get_adapter_params(model))
        if self.settings.activation_checkpointing:
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
        if qlora:
            log.info(f"QLoRA: NF4 base ready in {time.perf_counter() - start:.0f} s")
        if self.settings.compile:
            training.compile_model(model)  # per layer; padded lengths vary, see pad_to_multiple_of
        return model

    # -------------------------------------------------------------------------------------------- the step

    def _forward(self, batch: dict[str, torch.Tensor], split: str = "train"):
        """Policy log-probs (with grad), reference log-probs (no grad), the loss."""
        batch = {k: v.to(self.settings.device) for k, v in batch.items()}
        policy = concatenated_logprobs(self._model, batch, self.settings.logprob_chunk_size,
                                       self.settings.flex_attention)  # fmt: skip
        return self._loss_fn(policy, self._reference.logprobs(batch, split)), policy

    def train(self) -> None:
        metrics, interval_start = PreferenceMetrics(), time.perf_counter()
        zero_gradients = ZeroGradientWatch(self._loss_fn)  # warns when the loss saturates (KTO at 1:4)
        loss_name = type(self._loss_fn).__name__.removesuffix("Loss")  # the progress bar: "DPO", "KTO", ...
        progress = tqdm(total=self._total_steps, initial=self.global_step, desc=loss_name, dynamic_ncols=True)
        s = self.settings
        for epoch in range(self.epochs_run, s.epochs):
            order = batch_order(self._data.train, self.seed, epoch, s.batch_size, s.shuffle, s.group_by_length,
                                s.prefix_sharing)  # fmt: skip
            loader = DataLoader(
                self._data.train,
                batch_size=s.batch_size * s.gradient_accumulation_steps,  # one optimizer step's pairs
                sampler=order[self._batches_done_in_epoch * s.batch_size :],
                collate_fn=list,
                drop_last=True,
                generator=torch.Generator(),  # not the global RNG: a resumed run must draw the same dropout masks
            )
            self._model.train()
            for samples in loader:
                if self._batches_done_in_epoch // s.gradient_accumulation_steps >= self._steps_per_epoch:
                    break
                # gradient_accumulation_steps micro-batches of batch_size pairs, or by max_micro_batch_tokens
                for members in self._data.micro_batches(samples):
                    batch = self._data.collate([samples[i] for i in members])
                    out, policy = self._forward(batch)
                    loss = out.losses.mean()
                    if not torch.isfinite(loss):
                        self._stop_on_nonfinite("loss", loss.item())
                    # weighted by its share of the step's pairs: the step's loss is the mean over all of them
                    (loss / (len(samples) / len(members))).backward()
                    self._master.accumulate_grads()  # into the fp32 master gradients (no-op without master copies)
                    metrics.update(out, policy, batch)
                self._batches_done_in_epoch += s.gradient_accumulation_steps

                grad_norm = torch.nn.utils.clip_grad_norm_(self._master.params,
                                                           max_norm=float(s.clip_grad_norm or math.inf))
                if not torch.isfinite(grad_norm):
                    self._stop_on_nonfinite("gradient norm", grad_norm.item())
                zero_gradients.update(grad_norm.item(), self.global_step + 1)
                lr = self._optimizer.param_groups[0]["lr"]  # the rate this step uses (logged with it)
                logging_step = (self.global_step + 1) % s.log_every_n_steps == 0
                # optimizer.step() on the master weights, then into the model; on logging steps also the share of
                # sampled weights the step left unchanged (bf16 rounding eating updates shows here)
                unchanged = self._master.step(self._optimizer, measure=logging_step)
                self._optimizer.zero_grad(set_to_none=True)
                self._lr_scheduler.step()
                self.global_step += 1
                progress.update(1)

                if self.global_step % s.log_every_n_steps == 0:
                    seconds = time.perf_counter() - interval_start
                    logged = metrics.compute()
                    logged.update(lr=lr, grad_norm=grad_norm.item(), unchanged_weight_share=unchanged,
                                  tokens_per_second=metrics.tokens / seconds,
                                  peak_memory_gib=peak_memory_gib(s.device))  # fmt: skip
                    self._metric_logger.log_dict(logged, step=self.global_step)
                    progress.set_postfix(loss=f"{logged['loss']:.4f}", acc=f"{logged['rewards/accuracies']:.2f}")
                    metrics, interval_start = PreferenceMetrics(), time.perf_counter()
                if s.eval_every_n_steps and self.global_step % s.eval_every_n_steps == 0:
                    self.evaluate()
                if s.save_every_n_steps and self.global_step % s.save_every_n_steps == 0:
                    self.save_checkpoint()
            self.epochs_run, self._batches_done_in_epoch = epoch + 1, 0
        progress.close()
        if self._data.eval is not None and self._last_eval_step != self.global_step:
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
        loader = DataLoader(self._data.eval, batch_size=self.settings.batch_size, collate_fn=self._data.collate,
                            generator=torch.Generator())  # fmt: skip
        for batch in loader:
            out, policy = self._forward(batch, "eval")
            metrics.update(out, policy)
        results = {f"eval/{name}": value for name, value in metrics.compute().items()}
        if self._samples:  # the reference is the base model: adapters off
            sampled, rows = sample_and_score(self._model, self._reference.sampling_context, self._sample_prompts,
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
        state = training_state(self._progress(), self._optimizer, self._lr_scheduler, self._fingerprint,
                               master_weights=self._master)  # fmt: skip
        path = self.settings.output_dir / f"step_{self.global_step}"
        try:
            save_lora_checkpoint(self._checkpointer, path, self._model, self._lora, self.settings.dtype, state)
        except Exception as error:  # disk full, read-only, ...: one message naming the path and the last good one
            raise save_failed(path, error, self._last_checkpoint) from None
        self._last_checkpoint = path
        log.info(f"saved checkpoint {path}")
        return path

    def _progress(self) -> dict[str, int]:
        return {"global_step": self.global_step, "epochs_run": self.epochs_run,
                "batches_done_in_epoch": self._batches_done_in_epoch}  # fmt: skip

    def _load_recipe_state(self, checkpoint_dir: Path) -> None:
        progress = restore_training_state(checkpoint_dir, self._optimizer, self._lr_scheduler, self._fingerprint,
                                          master_weights=self._master)  # fmt: skip
        self.global_step = progress["global_step"]
        self.epochs_run = progress["epochs_run"]
        self._batches_done_in_epoch = progress["batches_done_in_epoch"]
        self._last_checkpoint = checkpoint_dir
        log.info(f"resumed from {checkpoint_dir} at step {self.global_step}")

    def cleanup(self) -> None:
        self._metric_logger.close()
        log.info(f"plot this run: python -m dpo_components.tools.plot {self.settings.output_dir}")


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="LoRADPORecipeSingleDevice", cfg=cfg)
    recipe = LoRADPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
