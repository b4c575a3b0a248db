"""Online / iterative DPO with LoRA or QLoRA on one device: sample from the policy, score, pair, train, round by round.

    tune run recipes/online_dpo_single_device.py --config recipe_configs/tiny/online_dpo_single_device.yaml
    python recipes/online_dpo_single_device.py --config recipe_configs/tiny/online_dpo_single_device.yaml key=value

The LoRA DPO recipe (``recipes/lora_dpo_single_device.py``) plus rounds. Each round (``online`` section; one
component, ``dpo_components.online.RoundMaker``, makes it):

1. take ``prompts_per_round`` prompts of ``prompt_dataset`` (seeded passes over it);
2. sample ``samples_per_prompt`` responses to each from the current policy (batched, KV cache; ``temperature``,
   ``top_p``, ``top_k``), or in round 0 read them from ``samples_file``;
3. score every response with ``reward_fn`` (``dpo_components.online.rewards``: a Python function of the texts, or a
   Hugging Face sequence-classification reward model);
4. pair them by ``pair_rule`` (best vs worst; ties and margins up to ``min_margin`` dropped);
5. compute the round's reference log-probs of the pairs once: the starting model (adapters off, ``reference:
   start``: online DPO) or the policy as the round begins (``reference: previous_round``: iterative DPO);
6. take ``steps_per_round`` optimizer steps of the loss (any pairwise ``dpo_components.losses`` class) on the pairs,
   ``batch_size x gradient_accumulation_steps`` pairs a step, passing over them as often as needed (reshuffled each
   pass with ``shuffle: true``); a step runs as the offline recipes' do: micro-batches of ``batch_size`` pairs or, with
   ``max_micro_batch_tokens: N``, of at most N computed tokens, each weighted by its share of the step's pairs.

A round with fewer pairs than ``batch_size`` trains no step (a warning names it; its steps are not made up).
``reference.batch_size`` sets the batch of the per-round reference pass; ``reference.mode`` does not apply.
Every round's prompts, samples, scores and pairs are written under ``<output_dir>/rounds/round_<r>/`` before
training on them (``pairs.jsonl`` is a preference file the offline recipes read); a checkpoint is written at the end
of every round and every ``save_every_n_steps``. A killed run (``resume_from_checkpoint: true``) continues from its
last checkpoint with the round's files, to the same weights as a run never stopped.
Per round the recipe logs ``online/*``: the samples' reward mean / min / max / std, the pairs kept, their margin,
the KL of the policy from the starting model (estimated on the round's own samples) and the response length; per
step the usual loss, rewards and accuracies; eval on ``eval_dataset`` pairs against the starting model, and
``eval_samples`` as the other recipes. The other recipe keys (dtype, QLoRA, gradient accumulation, clipping,
compile, prefix sharing, packing, metric loggers) work as in ``recipes/lora_dpo_single_device.py``.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchtune import config, training, utils

from dpo_components.checkpointing import (
    check_same_run,
    checkpoint_fingerprint,
    load_peft_adapter,
    lora_settings,
    peft_layout,
    restore_training_state,
    run_fingerprint,
    save_failed,
    save_lora_checkpoint,
    training_state,
)
from dpo_components.data.collate import make_collator
from dpo_components.data.micro_batches import plan_micro_batches
from dpo_components.data.recipe_data import check_data_kind, write_data_report
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.models.builders import lora_model
from dpo_components.online.round_maker import (
    RoundMaker,
    check_prompts_fit,
    claim_rounds,
    online_fingerprint_keys,
    prepare_online_output_dir,
)
from dpo_components.online.rounds import OnlineSettings
from dpo_components.precision import MasterWeights
from dpo_components.reference import Reference
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
from dpo_components.settings import (
    ConfigError,
    RecipeSettings,
    instantiate_loss,
    optional_component,
    prepare_and_check_inputs,
)

log = utils.get_logger("INFO")


class OnlineDPORecipeSingleDevice:
    def __init__(self, cfg: DictConfig) -> None:
        self.settings = RecipeSettings.from_config(cfg, reference_checkpointer=False)
        self.online = OnlineSettings.from_config(cfg.get("online"))
        if cfg.get("max_steps_per_epoch") is not None:
            raise ConfigError("max_steps_per_epoch is not used by the online recipe: online.rounds x "
                              "online.steps_per_round set the number of steps")  # fmt: skip
        self.seed = training.set_seed(self.settings.seed)
        prepare_and_check_inputs(cfg)  # the tiny configs build their model and data on first use
        # steps taken, rounds done (the progress record's epochs), position in the round, last checkpoint
        self.progress = RunProgress(where=lambda: f" (round {self.progress.epochs_run})")

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        s = self.settings
        self._loss_fn = instantiate_loss(cfg.loss, s)  # first: a loss the settings refuse stops here
        if self._loss_fn.data_kind != "pairs":
            raise ConfigError(f"the online recipe trains on pairs of its own samples; {type(self._loss_fn).__name__} "
                              "trains on unpaired rows")  # fmt: skip
        # prepare_output_dir, and the rounds: a run killed in round 0 (no checkpoint yet) resumes from its files
        resume_dir, resume_round_0 = prepare_online_output_dir(s, self.online)
        self._metric_logger = start_metric_logger(cfg.metric_logger, cfg)
        self._checkpointer = config.instantiate(cfg.checkpointer, resume_from_checkpoint=False)
        adapter = load_peft_adapter(resume_dir, **peft_layout(self._checkpointer)) if resume_dir else None
        self._model = lora_model(cfg.model, s, self._checkpointer.load_checkpoint()[training.MODEL_KEY], adapter)
        self._lora = lora_settings(cfg.model)
        self._tokenizer = config.instantiate(cfg.tokenizer)
        prompts = config.instantiate(cfg.prompt_dataset, self._tokenizer)
        check_prompts_fit(prompts, self.online, s, self._model.max_seq_len)  # a prompt + max_new_tokens fits
        eval_cfg = optional_component(cfg, "eval_dataset")
        self._eval_data = config.instantiate(eval_cfg, self._tokenizer) if eval_cfg else None
        check_data_kind(self._loss_fn, eval_dataset=self._eval_data)
        write_data_report(s.output_dir, prompt_dataset=prompts, eval_dataset=self._eval_data)
        if s.eval_every_n_steps and self._eval_data is None:
            raise ConfigError("eval_every_n_steps is set but there is no eval_dataset")
        self._collate = make_collator(self._tokenizer.pad_id, self._model.max_seq_len, s.pad_to_multiple_of,
                                      s.prefix_sharing, datasets={"eval_dataset": self._eval_data},
                                      packing=s.packing, packing_row_tokens=s.packing_row_tokens)  # fmt: skip
        self._fingerprint = run_fingerprint(cfg, prompts, seed=self.seed, **online_fingerprint_keys(cfg))
        if resume_dir is not None:
            check_same_run(resume_dir, checkpoint_fingerprint(resume_dir), self._fingerprint)
        claim_rounds(s.output_dir, self._fingerprint, resume_round_0)
        self._sampling = eval_sampling(cfg, self._eval_data, self._tokenizer, self.seed)
        # the starting model: the base with the adapters off (eval, KL); None for a reference-free loss
        self._start = Reference("adapters_off" if self._loss_fn.needs_reference else "none", s.device,
                                policy=self._model, chunk_size=s.logprob_chunk_size,
                                flex_attention=s.flex_attention)  # fmt: skip
        # each round's prompts, samples, scores, pairs, files and reference table (dpo_components.online)
        self._rounds = RoundMaker(self.online, s, policy=self._model, tokenizer=self._tokenizer, prompts=prompts,
                                  reward=config.instantiate(cfg.reward_fn), collate=self._collate,
                                  loss=self._loss_fn, start=self._start, seed=self.seed,
                                  metric_logger=self._metric_logger)  # fmt: skip

        self._total_steps = self.online.rounds * self.online.steps_per_round
        self._master = MasterWeights(self._model.named_parameters(), s.master_dtype, seed=self.seed)
        self._optimizer = config.instantiate(cfg.optimizer, self._master.params)
        self._lr_scheduler = config.instantiate(cfg.lr_scheduler, self._optimizer, num_training_steps=self._total_steps)
        self._master.check_optimizer(self._optimizer)
        if resume_dir is not None:
            self._load_recipe_state(resume_dir)
        o = self.online
        reference = "the starting model" if o.reference == "start" else "the policy as each round starts (iterative)"
        log.info(
            f"{o.rounds} rounds of {o.prompts_per_round} prompts x {o.samples_per_prompt} samples, "
            f"{o.steps_per_round} steps each; pairs {o.pair_rule} (margin > {o.min_margin}); reward "
            f"{self._rounds.reward!r}; loss {self._loss_fn}; reference {reference}; the optimizer steps "
            f"{self._master.describe()}"
        )

    # -------------------------------------------------------------------------------------------- the step

    def _forward(self, batch: dict[str, torch.Tensor], reference: Reference, split: str):
        """Policy log-probs (with grad), reference log-probs (the round's table, or adapters off; no grad), the loss."""
        batch = {k: v.to(self.settings.device) for k, v in batch.items()}
        policy = concatenated_logprobs(self._model, batch, self.settings.logprob_chunk_size,
                                       self.settings.flex_attention)  # fmt: skip
        return self._loss_fn(policy, reference.logprobs(batch, split)), policy

    def train(self) -> None:
        s, o, progress = self.settings, self.online, self.progress
        step_log = StepLog(s, self._metric_logger, self._loss_fn, self._total_steps, progress.global_step, "online ")
        for r in range(progress.epochs_run, o.rounds):  # the progress record's epochs are rounds here
            # sampled, scored, paired, written; or read back (a resume, inside the round too: mid_round)
            pairs, reference = self._rounds.round(r, progress.global_step, progress.batches_done_in_epoch > 0)
            steps = self._rounds.steps(pairs, r)
            if not steps:
                log.warning(f"round {r}: {len(pairs)} pairs, fewer than batch_size {s.batch_size}: no step this round "
                            "(lower online.min_margin, raise prompts_per_round or samples_per_prompt)")  # fmt: skip
                progress.next_epoch(r)
                continue
            self._model.train()
            for step_pairs in steps[progress.batches_done_in_epoch // s.gradient_accumulation_steps :]:
                samples = [pairs[i] for i in step_pairs]
                # gradient_accumulation_steps micro-batches of batch_size pairs, or by max_micro_batch_tokens
                for members in plan_micro_batches(samples, s.batch_size, s.max_micro_batch_tokens, self._collate):
                    batch = self._collate([samples[i] for i in members])
                    out, policy = self._forward(batch, reference, "train")
                    # weighted by its share of the step's pairs: the step's loss is the mean over all of them
                    (out.losses.mean() / (len(samples) / len(members))).backward()
                    self._master.accumulate_grads()  # into the fp32 master gradients (no-op without master copies)
                    step_log.update(out, policy, batch)
                progress.batches_done_in_epoch += s.gradient_accumulation_steps

                grad_norm = clip_gradients(self._master.params, s.clip_grad_norm)
                logged = step_log.step_metrics()
                progress.stop_if_nonfinite(logged["loss"], grad_norm)  # before the optimizer step
                lr = self._optimizer.param_groups[0]["lr"]  # the rate this step uses (logged with it)
                unchanged = self._master.step(self._optimizer, measure=due(progress.global_step + 1,
                                                                           s.log_every_n_steps))  # fmt: skip
                self._optimizer.zero_grad(set_to_none=True)
                self._lr_scheduler.step()
                progress.global_step += 1

                step_log.write(progress.global_step, logged, lr=lr, grad_norm=grad_norm,
                               unchanged_weight_share=unchanged)  # fmt: skip
                if due(progress.global_step, s.eval_every_n_steps):
                    self.evaluate()
                last_of_round = progress.batches_done_in_epoch == len(steps) * s.gradient_accumulation_steps
                if due(progress.global_step, s.save_every_n_steps) and not last_of_round:
                    self.save_checkpoint()  # the round's last step is saved below, as a finished round
            progress.next_epoch(r)
            self.save_checkpoint()
        step_log.close()
        if progress.needs_final_eval(self._eval_data is not None):
            self.evaluate()
        if progress.needs_final_save():
            self.save_checkpoint()

    def evaluate(self) -> dict[str, float]:
        """Loss, preference accuracy and margins on the held-out pairs against the starting model, and with
        ``eval_samples`` responses of policy and start: logged as eval/*."""
        self.progress.last_eval_step = self.progress.global_step
        return evaluate(self._model, partial(self._forward, reference=self._start, split="eval"), self._eval_data,
                        self._collate, self.settings.batch_size, self.settings.device, step=self.progress.global_step,
                        metric_logger=self._metric_logger, sampling=self._sampling,
                        reference=self._start.sampling_context)  # fmt: skip

    # ------------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``<output_dir>/step_<N>/``: merged HF model, PEFT adapter, and the state for an exact resume."""
        state = training_state(self.progress.counters(), self._optimizer, self._lr_scheduler, self._fingerprint,
                               master_weights=self._master)  # fmt: skip
        state["round_files"] = self._rounds.trained_on  # what a resume inside this round must find unchanged
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
        log.info(f"the rounds' samples and pairs: {self.settings.output_dir / 'rounds'}")
        close_metric_logger(self._metric_logger, self.settings.output_dir)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="OnlineDPORecipeSingleDevice", cfg=cfg)
    recipe = OnlineDPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
