"""TRL's DPOTrainer on the benchmark's checkpoint and pairs, timed like the recipe rows (one process per run).

Called by ``benchmarks/dpo_throughput.py`` when ``trl`` and ``peft`` are installed. The same LoRA (rank 16,
alpha 32, q/k/v/o + MLP), AdamW, learning rate, batch size and pairs in file order (the trainer's random sampler
is replaced by a sequential one); reference = the base model with the adapter disabled, as in the LoRA recipes.
Gradient checkpointing is off and the dtype is the recipe rows' (TRL's CPU defaults would turn on both bf16 and
checkpointing).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig
from peft.tuners.lora import torchao as peft_torchao
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

# PEFT 0.21 refuses torchao < 0.16 (torchtune 0.6.1 needs <= 0.15) as soon as it looks for torchao layers; this
# run has none, so tell PEFT that torchao is absent.
peft_torchao.is_torchao_available = lambda: False


class InOrderDPOTrainer(DPOTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class StepTimer(TrainerCallback):
    """Writes ``<out>/logs/timing.json`` in the format of ``benchmarks/step_timer.py``."""

    def __init__(self, out: Path) -> None:
        self.path, self.created, self.steps, self.loss = out / "logs" / "timing.json", time.perf_counter(), [], None

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append((state.global_step, time.perf_counter() - self.created))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.loss = (logs or {}).get("loss", self.loss)

    def on_train_end(self, args, state, control, **kwargs):
        cuda = torch.cuda.is_available()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({
            "steps": self.steps, "closed": time.perf_counter() - self.created,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "cuda_max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "last_metrics": {"loss": self.loss},
        }, indent=1))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--model-dir", "--data", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    out = Path(args.out)
    timer = StepTimer(out)  # started before the model loads, like the recipes' logger
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.pad_token = "<|finetune_right_pad_id|>"
    config = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=1e-4, weight_decay=0.0, lr_scheduler_type="cosine", warmup_steps=2, beta=0.1,
        max_length=args.max_length, gradient_checkpointing=False, bf16=args.dtype == "bf16", fp16=False,
        logging_steps=1, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )  # fmt: skip
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    trainer = InOrderDPOTrainer(model=model, args=config, processing_class=tokenizer, peft_config=lora,
                                train_dataset=load_dataset("json", data_files=args.data, split="train"),
                                callbacks=[timer])  # fmt: skip
    trainer.train()


if __name__ == "__main__":
    main()
