"""Online / iterative DPO with LoRA or QLoRA on one device: sample from the policy, score, pair, train, round by round.

    tune run recipes/online_dpo_single_device.py --config recipe_configs/tiny/online_dpo_single_device.yaml
    python recipes/online_dpo_single_device.py --config recipe_configs/tiny/online_dpo_single_device.yaml key=value

Each round (``online`` section; the shared parts in ``dpo_components.online``):

1. take ``prompts_per_round`` prompts of ``prompt_dataset`` (seeded passes over it);
2. sample ``samples_per_prompt`` responses to each from the current policy (batched, KV cache; ``temperature``,
   ``top_p``, ``top_k``), or in round 0 read them from ``samples_file``;
3. score every response with ``reward_fn`` (``dpo_components.rewards``: a Python function of the texts, or a
   Hugging Face sequence-classification reward model);
4. pair them by ``pair_rule`` (best vs worst; ties and margins up to ``min_margin`` dropped);
5. compute the round's reference log-probs of the pairs once: the starting model (adapters off, ``reference:
   start``: online DPO) or the policy as the round begins (``reference: previous_round``: iterative DPO);
6. take ``steps_per_round`` optimizer steps of the loss (any pairwise ``dpo_components.losses`` class) on the pairs,
   ``batch_size`` pairs per micro-batch, passing over them as often as needed (reshuffled each pass with
   ``shuffle: true``).

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

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from torchtune import config, modules, training, utils
from torchtune.modules.peft import (
    disable_adapter,
    get_adapter_params,
    set_trainable_params,
    validate_missing_and_unexpected_for_lora,
)
from tqdm import tqdm

from dpo_components import online
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
    step_dirs,
    training_state,
)
from dpo_components.data import PreferenceDataset
from dpo_components.data.collate import make_collator
from dpo_components.data.order import batch_order
from dpo_components.data.recipe_data import check_data_kind
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.metrics import PreferenceMetrics, ZeroGradientWatch, peak_memory_gib
from dpo_components.models import apply_model_fixes
from dpo_components.models.quantization import nf4_estimate
from dpo_components.precision import MasterWeights
from dpo_components.reference import Reference, compute_reference_logprobs, load_or_compute
from dpo_components.rewards import score
from dpo_components.samples import eval_sampling, log_samples, response_logprobs, sample_and_score
from dpo_components.settings import (
    ConfigError,
    RecipeSettings,
    instantiate_loss,
    optional_component,
    prepare_and_check_inputs,
)

log = utils.get_logger("INFO")
RUN_FILE = "run.json"  # rounds/run.json: the fingerprint of the run the rounds belong to


class OnlineDPORecipeSingleDevice:
    def __init__(self, cfg: DictConfig) -> None:
        self.settings = RecipeSettings.from_config(cfg, reference_checkpointer=False)
        self.online = online.OnlineSettings.from_config(cfg.get("online"))
        if cfg.get("max_steps_per_epoch") is not None:
            raise ConfigError("max_steps_per_epoch is not used by the online recipe: online.rounds x "
                              "online.steps_per_round set the number of steps")  # fmt: skip
        if self.settings.max_micro_batch_tokens is not None:
            raise ConfigError("max_micro_batch_tokens is not supported by the online recipe yet: its steps are "
                              "gradient_accumulation_steps micro-batches of batch_size pairs")  # fmt: skip
        self.seed = training.set_seed(self.settings.seed)
        prepare_and_check_inputs(cfg)  # the tiny configs build their model and data on first use
        self.global_step = 0  # optimizer steps taken
        self.rounds_done = 0
        self._batches_done_in_round = 0  # micro-batches of the current round already trained on
        self._last_checkpoint: Path | None = None
        self._last_eval_step: int | None = None

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        s = self.settings
        rounds = s.output_dir / "rounds"
        # killed in round 0, before the first checkpoint: resume starts at step 0 with the round's files
        self._resume_round_0 = s.resume and not step_dirs(s.output_dir) and (rounds / RUN_FILE).exists()
        resume_dir = prepare_output_dir(s.output_dir, s.resume and not self._resume_round_0, s.overwrite_output_dir)
        if resume_dir is None and not self._resume_round_0 and rounds.exists():
            if not s.overwrite_output_dir:
                raise ConfigError(f"output_dir {s.output_dir} holds the rounds of an earlier run ({rounds}). Set "
                                  "resume_from_checkpoint=true to continue it, overwrite_output_dir=true to delete "
                                  "them and start over, or choose another output_dir.")  # fmt: skip
            shutil.rmtree(rounds)
        self._metric_logger = config.instantiate(cfg.metric_logger)
        self._metric_logger.log_config(cfg)
        self._checkpointer = config.instantiate(cfg.checkpointer, resume_from_checkpoint=False)
        base_state = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
        self._model = self._setup_model(cfg, base_state, resume_dir)
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._loss_fn = instantiate_loss(cfg.loss)
        if self._loss_fn.data_kind != "pairs":
            raise ConfigError(f"the online recipe trains on pairs of its own samples; {type(self._loss_fn).__name__} "
                              "trains on unpaired rows")  # fmt: skip
        self._prompts = config.instantiate(cfg.prompt_dataset, self._tokenizer)
        eval_cfg = optional_component(cfg, "eval_dataset")
        self._eval_data = config.instantiate(eval_cfg, self._tokenizer) if eval_cfg else None
        check_data_kind(self._loss_fn, eval_dataset=self._eval_data)
        if s.eval_every_n_steps and self._eval_data is None:
            raise ConfigError("eval_every_n_steps is set but there is no eval_dataset")
        self._check_lengths_fit()
        self._collate = make_collator(self._tokenizer.pad_id, self._model.max_seq_len, s.pad_to_multiple_of,
                                      s.prefix_sharing, datasets={"eval_dataset": self._eval_data},
                                      packing=s.packing, packing_row_tokens=s.packing_row_tokens)  # fmt: skip
        self._reward = config.instantiate(cfg.reward_fn)
        self._fingerprint = run_fingerprint(cfg, self._prompts, seed=self.seed, **_online_keys(cfg))
        if resume_dir is not None:
            check_same_run(resume_dir, checkpoint_fingerprint(resume_dir), self._fingerprint)
        if self._resume_round_0:
            check_same_run(rounds, json.loads((rounds / RUN_FILE).read_text()), self._fingerprint)
            log.info(f"resuming at step 0: no checkpoint yet, reading round 0's files in {rounds}")
        else:
            online.write_atomic(rounds / RUN_FILE, json.dumps(self._fingerprint, indent=1) + "\n")
        self._samples, self._sample_prompts = eval_sampling(cfg, self._eval_data)
        # the starting model: the base with the adapters off (eval, KL); None for a reference-free loss
        kind = "adapters_off" if self._loss_fn.needs_reference else "none"
        self._start = Reference(kind, s.device, policy=self._model, chunk_size=s.logprob_chunk_size,
                                flex_attention=s.flex_attention)  # fmt: skip

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
            f"{o.steps_per_round} steps each; pairs {o.pair_rule} (margin > {o.min_margin}); reward {self._reward!r}; "
            f"loss {self._loss_fn}; reference {reference}; the optimizer steps {self._master.describe()}"
        )

    def _check_lengths_fit(self) -> None:
        """Every prompt plus ``max_new_tokens`` (twice with prefix sharing) fits the model, named at setup."""
        responses, multiple = 2 if self.settings.prefix_sharing else 1, self.settings.pad_to_multiple_of
        for i in range(len(self._prompts)):
            need = len(self._prompts[i]["prompt_ids"]) + responses * self.online.max_new_tokens
            need += -need % multiple  # padded
            if need > self._model.max_seq_len:
                raise ConfigError(
                    f"prompt_dataset: prompt {i} ({self._prompts.source} row {self._prompts.row_numbers[i]}) with "
                    f"online.max_new_tokens needs {need} tokens, more than the model's max_seq_len "
                    f"{self._model.max_seq_len}; set prompt_dataset.max_prompt_length or lower max_new_tokens"
                )

    def _setup_model(self, cfg: DictConfig, base_state: dict[str, Any], resume_dir: Path | None) -> torch.nn.Module:
        start, qlora = time.perf_counter(), cfg.model.get("quantize_base", False)
        if qlora:
            log.info(f"QLoRA: quantizing the base linears to NF4 {nf4_estimate(base_state, self.settings.device)} ...")
        with training.set_default_dtype(self.settings.dtype), self.settings.device:
            model = apply_model_fixes(config.instantiate(cfg.model))
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
            training.compile_model(model)
        return model

    # ------------------------------------------------------------------------------------------- a round

    def _round(self, r: int) -> tuple[PreferenceDataset, Reference]:
        """Round ``r``'s pairs and their reference: read from the round's files when it is complete (a resume),
        else sampled (or read from ``samples.jsonl`` if sampling finished before a kill), scored, paired, written."""
        o, s, where = self.online, self.settings, f"round {r}"
        directory = online.round_dir(s.output_dir, r)
        if (directory / "round.json").exists():
            samples = online.read_jsonl(directory / "samples.jsonl")
            rewards = [row["rewards"] for row in online.read_jsonl(directory / "scores.jsonl")]
            pairs = online.build_pairs(rewards, [row["responses"] for row in samples], o.pair_rule, o.min_margin)
            cache = load_file(directory / "reference_logps.safetensors") if self._needs_table(pairs) else None
            log.info(f"{where}: read {len(pairs)} pairs from {directory}")
            return online.pairs_dataset(samples, pairs, where), self._round_reference(cache)

        started = time.perf_counter()
        if (directory / "samples.jsonl").exists():
            samples = online.read_jsonl(directory / "samples.jsonl")
        elif r == 0 and o.samples_file:
            samples = online.fixed_samples(o.samples_file, self._tokenizer, self._model.max_seq_len)
            online.write_jsonl(directory / "samples.jsonl", samples)
        else:
            indices = online.round_prompt_indices(len(self._prompts), o.prompts_per_round, self.seed, r)
            samples = online.round_samples_of(self._prompts, indices)
            responses = online.sample_round(self._model, [row["prompt_ids"] for row in samples], self._tokenizer, o,
                                            online.sampling_seed(self.seed, r))  # fmt: skip
            for row, sampled in zip(samples, responses):
                row["responses"] = sampled
            online.write_jsonl(directory / "samples.jsonl", samples)
        sampled_at = time.perf_counter()

        flat = [(row["messages"], row["prompt_ids"], resp) for row in samples for resp in row["responses"]]
        scores = score(self._reward, [m for m, _, _ in flat], [resp["text"] for _, _, resp in flat], where)
        # the KL estimate needs samples of the policy itself: temperature 1, no top-p / top-k, not a samples_file
        own_samples = o.temperature == 1.0 and o.top_p == 1.0 and o.top_k is None and not (r == 0 and o.samples_file)
        policy_logps, start_logps = (self._kl_terms([p for _, p, _ in flat], [resp["ids"] for _, _, resp in flat])
                                     if own_samples else ([None] * len(flat), [None] * len(flat)))  # fmt: skip
        rows, at = [], 0
        for row in samples:
            k = len(row["responses"])
            rows.append({"prompt_index": row["prompt_index"], "rewards": scores[at : at + k],
                         "policy_logps": policy_logps[at : at + k], "start_logps": start_logps[at : at + k]})
            at += k
        online.write_jsonl(directory / "scores.jsonl", rows)
        rewards = [row["rewards"] for row in rows]
        pairs = online.build_pairs(rewards, [row["responses"] for row in samples], o.pair_rule, o.min_margin)
        online.write_jsonl(directory / "pairs.jsonl", online.preference_rows(samples, rewards, pairs))
        dataset = online.pairs_dataset(samples, pairs, where)
        self._check_pairs_fit(dataset, where)
        cache = None
        if self._needs_table(pairs):  # the reference's log-probs of the round's pairs, once
            live = self._start if o.reference == "start" else Reference("frozen_copy", s.device, model=self._model,
                                                                        chunk_size=s.logprob_chunk_size,
                                                                        flex_attention=s.flex_attention)  # fmt: skip
            cache = load_or_compute(directory / "reference_logps.safetensors",
                                    lambda: compute_reference_logprobs(live, dataset, self._collate,
                                                                       s.reference.batch_size))  # fmt: skip
        figures = online.round_figures(rewards, pairs, [row["responses"] for row in samples],
                                       [row["policy_logps"] for row in rows] if own_samples else None,
                                       [row["start_logps"] for row in rows] if own_samples else None)  # fmt: skip
        figures.update({"online/round": float(r), "online/sampling_seconds": sampled_at - started,
                        "online/scoring_seconds": time.perf_counter() - sampled_at})  # fmt: skip
        summary = {"round": r, "sampling_seed": online.sampling_seed(self.seed, r), "prompts": len(samples),
                   "samples_file": o.samples_file if r == 0 else None, "reward": repr(self._reward),
                   "reference": o.reference, "figures": figures}  # fmt: skip
        online.write_atomic(directory / "round.json", json.dumps(summary, indent=1) + "\n")
        self._metric_logger.log_dict(figures, step=self.global_step)
        kl = f", KL to start {figures['online/kl_to_start']:.3f}" if own_samples else ""
        log.info(f"{where}: {len(samples)} prompts, reward mean {figures['online/reward_mean']:.3f} "
                 f"(min {figures['online/reward_min']:.3f}, max {figures['online/reward_max']:.3f}), {len(pairs)} "
                 f"pairs{kl}")  # fmt: skip
        return dataset, self._round_reference(cache)

    def _check_pairs_fit(self, pairs: PreferenceDataset, where: str) -> None:
        """Every pair of the round fits the model in the batch layout (padding, prefix sharing, packing), named."""
        s = self.settings
        make_collator(self._tokenizer.pad_id, self._model.max_seq_len, s.pad_to_multiple_of, s.prefix_sharing,
                      datasets={f"{where} pairs": pairs}, packing=s.packing,
                      packing_row_tokens=s.packing_row_tokens)  # fmt: skip

    def _needs_table(self, pairs: list) -> bool:
        return self._loss_fn.needs_reference and len(pairs) >= self.settings.batch_size

    def _round_reference(self, cache: dict[str, torch.Tensor] | None) -> Reference:
        s = self.settings
        if cache is None:
            return Reference("none", s.device)
        return Reference("precomputed", s.device, cache={"train": cache})

    @torch.no_grad()
    def _kl_terms(self, prompts: list[list[int]], responses: list[list[int]]) -> tuple[list[float], list[float]]:
        """log pi(y|x) and log start(y|x) of each sample (their difference averages to the KL to the start)."""
        was_training, step = self._model.training, self.online.generation_batch_size
        self._model.eval()
        policy, start = [], []
        for i in range(0, len(prompts), step):
            batch = (prompts[i : i + step], responses[i : i + step])
            policy += response_logprobs(self._model, *batch).tolist()
            with disable_adapter(self._model):
                start += response_logprobs(self._model, *batch).tolist()
        self._model.train(was_training)
        return policy, start

    def _round_batches(self, pairs: PreferenceDataset, r: int) -> list[list[int]]:
        """The micro-batches of round ``r`` (pair indices): passes over the pairs, each in its own seeded order
        (pass p of round r is epoch p * rounds + r of ``batch_order``), cut into whole batches."""
        s, need = self.settings, self.online.steps_per_round * self.settings.gradient_accumulation_steps
        if len(pairs) < s.batch_size:
            return []
        batches: list[list[int]] = []
        for p in range(math.ceil(need / (len(pairs) // s.batch_size))):
            order = batch_order(pairs, self.seed, p * self.online.rounds + r, s.batch_size, s.shuffle,
                                s.group_by_length, s.prefix_sharing)  # fmt: skip
            batches += [order[i : i + s.batch_size] for i in range(0, len(order) - s.batch_size + 1, s.batch_size)]
        return batches[:need]

    # -------------------------------------------------------------------------------------------- the step

    def _forward(self, batch: dict[str, torch.Tensor], reference: Reference, split: str = "train"):
        batch = {k: v.to(self.settings.device) for k, v in batch.items()}
        policy = concatenated_logprobs(self._model, batch, self.settings.logprob_chunk_size,
                                       self.settings.flex_attention)  # fmt: skip
        return self._loss_fn(policy, reference.logprobs(batch, split)), policy

    def train(self) -> None:
        s, o = self.settings, self.online
        metrics, interval_start = PreferenceMetrics(), time.perf_counter()
        zero_gradients = ZeroGradientWatch(self._loss_fn)
        loss_name = "online " + type(self._loss_fn).__name__.removesuffix("Loss")
        progress = tqdm(total=self._total_steps, initial=self.global_step, desc=loss_name, dynamic_ncols=True)
        for r in range(self.rounds_done, o.rounds):
            pairs, reference = self._round(r)
            batches = self._round_batches(pairs, r)
            if not batches:
                log.warning(f"round {r}: {len(pairs)} pairs, fewer than batch_size {s.batch_size}: no step this round "
                            "(lower online.min_margin, raise prompts_per_round or samples_per_prompt)")  # fmt: skip
                self.rounds_done, self._batches_done_in_round = r + 1, 0
                continue
            self._model.train()
            for indices in batches[self._batches_done_in_round :]:
                batch = self._collate([pairs[i] for i in indices])
                out, policy = self._forward(batch, reference)
                loss = out.losses.mean()
                if not torch.isfinite(loss):
                    self._stop_on_nonfinite("loss", loss.item())
                (loss / s.gradient_accumulation_steps).backward()
                self._master.accumulate_grads()
                metrics.update(out, policy, batch)
                self._batches_done_in_round += 1
                if self._batches_done_in_round % s.gradient_accumulation_steps:
                    continue

                grad_norm = torch.nn.utils.clip_grad_norm_(self._master.params,
                                                           max_norm=float(s.clip_grad_norm or math.inf))
                if not torch.isfinite(grad_norm):
                    self._stop_on_nonfinite("gradient norm", grad_norm.item())
                zero_gradients.update(grad_norm.item(), self.global_step + 1)
                lr = self._optimizer.param_groups[0]["lr"]
                logging_step = (self.global_step + 1) % s.log_every_n_steps == 0
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
                last_of_round = self._batches_done_in_round == len(batches)
                if s.save_every_n_steps and self.global_step % s.save_every_n_steps == 0 and not last_of_round:
                    self.save_checkpoint()  # the round's last step is saved below, as a finished round
            self.rounds_done, self._batches_done_in_round = r + 1, 0
            self.save_checkpoint()
        progress.close()
        if self._eval_data is not None and self._last_eval_step != self.global_step:
            self.evaluate()
        if self._last_checkpoint is None or self._last_checkpoint.name != f"step_{self.global_step}":
            self.save_checkpoint()

    def _stop_on_nonfinite(self, what: str, value: float) -> None:
        last = self._last_checkpoint or "none saved yet"
        raise FloatingPointError(
            f"the {what} is {value} at step {self.global_step + 1} (round {self.rounds_done}); stopping before the "
            f"optimizer step. Last good checkpoint: {last}. Lower the learning rate, use fp32 or set clip_grad_norm."
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, preference accuracy and margins on the held-out pairs against the starting model, as eval/*."""
        was_training = self._model.training
        self._model.eval()
        results: dict[str, float] = {}
        if self._eval_data is not None:
            metrics = PreferenceMetrics()
            loader = DataLoader(self._eval_data, batch_size=self.settings.batch_size, collate_fn=self._collate,
                                generator=torch.Generator())  # fmt: skip
            for batch in loader:
                out, policy = self._forward(batch, self._start)
                metrics.update(out, policy)
            results = {f"eval/{name}": value for name, value in metrics.compute().items()}
        if self._samples:
            sampled, rows = sample_and_score(self._model, self._start.sampling_context, self._sample_prompts,
                                             self._tokenizer, self._samples, self.seed)  # fmt: skip
            results.update(sampled)
            log_samples(self._metric_logger, rows, self.global_step)
        self._metric_logger.log_dict(results, step=self.global_step)
        self._last_eval_step = self.global_step
        if "eval/loss" in results:
            accuracy, margin = results["eval/rewards/accuracies"], results["eval/rewards/margins"]
            log.info(f"step {self.global_step} eval: loss {results['eval/loss']:.4f}, accuracy {accuracy:.3f}, "
                     f"margin {margin:.4f}")  # fmt: skip
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
        except Exception as error:
            raise save_failed(path, error, self._last_checkpoint) from None
        self._last_checkpoint = path
        log.info(f"saved checkpoint {path}")
        return path

    def _progress(self) -> dict[str, int]:  # the shared state file's names: rounds are this recipe's epochs
        return {"global_step": self.global_step, "epochs_run": self.rounds_done,
                "batches_done_in_epoch": self._batches_done_in_round}  # fmt: skip

    def _load_recipe_state(self, checkpoint_dir: Path) -> None:
        progress = restore_training_state(checkpoint_dir, self._optimizer, self._lr_scheduler, self._fingerprint,
                                          master_weights=self._master)  # fmt: skip
        self.global_step = progress["global_step"]
        self.rounds_done = progress["epochs_run"]
        self._batches_done_in_round = progress["batches_done_in_epoch"]
        self._last_checkpoint = checkpoint_dir
        log.info(f"resumed from {checkpoint_dir} at step {self.global_step}, round {self.rounds_done}")

    def cleanup(self) -> None:
        self._metric_logger.close()
        log.info(f"the rounds' samples and pairs: {self.settings.output_dir / 'rounds'}; plot the run: "
                 f"python -m dpo_components.tools.plot {self.settings.output_dir}")  # fmt: skip


def _online_keys(cfg: DictConfig) -> dict[str, Any]:
    """The ``online`` and ``reward_fn`` keys for the run's fingerprint: a resume must sample, score and pair alike
    (a reward model's batch size left out)."""
    values = {f"online.{k}": v for k, v in OmegaConf.to_container(cfg.online, resolve=True).items()}
    reward = OmegaConf.to_container(cfg.reward_fn, resolve=True)
    reward.pop("batch_size", None)  # a reward model's batch size: lowered after an out-of-memory, then resumed
    values["reward_fn"] = json.dumps(reward, sort_keys=True)
    return values


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="OnlineDPORecipeSingleDevice", cfg=cfg)
    recipe = OnlineDPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
