"""What the likelihood-displacement diagnostics cost: the per-step ``displacement/*`` metrics, and the data audit
against the reference pass it resembles.

    OMP_NUM_THREADS=1 python benchmarks/displacement_cost.py [--steps 20] [--pairs 512]

On the tiny demo model and pairs (``outputs/tiny``, built on first use) in fp32 on the CPU, in one process:

- a LoRA DPO training step (policy forward and backward, reference forward with the adapters off, AdamW) at the
  demo's batch of 32 pairs, with the metrics and without (a ``DPOLoss`` whose ``displacement_metrics`` returns
  nothing), the two alternating step by step so that both see the same machine; the median of each;
- the data audit over ``--pairs`` pairs: a reference pass (batches of 64, no grad) without the audit's hidden
  states and with them (what a ``reference.mode: precomputed`` run does now, ``ResponseHiddenSums``), then the
  setup's report (``audit_report``: shared prefix, edit distance of the top pairs) and the standalone command's
  (every pair's edit distance); the extra seconds per 32 pairs as a share of the training step.
Prints a table of seconds and ratios, and the CPU kind (AVX2 or AVX-512: bf16 is not used here).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from pathlib import Path

import torch
from torchtune.modules.peft import disable_adapter, get_adapter_params, set_trainable_params

from dpo_components.audit import ResponseHiddenSums, audit_report
from dpo_components.data import make_collator, preference_dataset
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.losses import DPOLoss
from dpo_components.tiny.model import lora_tiny_llama
from dpo_components.tiny.prepare import prepare_tiny
from dpo_components.tiny.task_eval import load_tiny_checkpoint
from dpo_components.tiny.tokenizer import tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind (after 3 warm-up steps)")
    parser.add_argument("--pairs", type=int, default=512, help="pairs of the audit and reference passes")
    args = parser.parse_args()
    torch.manual_seed(0)
    tiny = prepare_tiny(REPO_ROOT / "outputs/tiny")
    tokenizer = tiny_tokenizer()
    data = preference_dataset(tokenizer, source="json", data_files=str(tiny / "data/train.jsonl"), max_length=96,
                              max_prompt_length=32, split=f"train[:{args.pairs}]")  # fmt: skip
    model = lora_tiny_llama(lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], lora_rank=16,
                            lora_alpha=32)  # fmt: skip
    sft = load_tiny_checkpoint(tiny / "sft_model", tiny / "scratch")
    model.load_state_dict(sft.state_dict(), strict=False)
    set_trainable_params(model, get_adapter_params(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    collate = make_collator(tokenizer.pad_id, model.max_seq_len, datasets={"d": data})

    class WithoutDisplacementMetrics(DPOLoss):
        def displacement_metrics(self, policy, reference):
            return {}

    losses = {True: DPOLoss(beta=5.0), False: WithoutDisplacementMetrics(beta=5.0)}

    def step(i: int, with_metrics: bool) -> float:
        batch = collate([data[(32 * i + j) % len(data)] for j in range(32)])
        start = time.perf_counter()
        policy = concatenated_logprobs(model, batch)
        with torch.no_grad(), disable_adapter(model):
            reference = concatenated_logprobs(model, batch)
        out = losses[with_metrics](policy, reference)
        out.losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        assert with_metrics == ("displacement/saturated" in out.metrics)
        return seconds

    for i in range(3):
        step(i, True)
    on, off = [], []
    for i in range(args.steps):  # alternating: both kinds see the same machine
        on.append(step(2 * i, True))
        off.append(step(2 * i + 1, False))
    def reference_pass(with_audit: bool) -> float:
        start = time.perf_counter()
        with torch.no_grad(), disable_adapter(model):
            for first in range(0, len(data), 64):
                batch = collate([data[i] for i in range(first, min(first + 64, len(data)))])
                sink = ResponseHiddenSums() if with_audit else None
                concatenated_logprobs(model, batch, hidden_sink=sink)
                if sink is not None:
                    sink.pair_ches()
        return time.perf_counter() - start

    model.eval()
    plain, audited = [], []
    for _ in range(3):  # alternating, the median of 3 each
        plain.append(reference_pass(False))
        audited.append(reference_pass(True))
    plain_pass, audited_pass = statistics.median(plain), statistics.median(audited)
    values = [0.0] * len(data)
    start = time.perf_counter()
    audit_report(data, values, tokenizer, every_edit_distance=False)
    setup_report = time.perf_counter() - start
    start = time.perf_counter()
    audit_report(data, values, tokenizer, every_edit_distance=True)
    command_report = time.perf_counter() - start

    step_on, step_off = statistics.median(on), statistics.median(off)
    per_step = lambda seconds: f"{100 * seconds / len(data) * 32 / step_off:.2f}%"  # noqa: E731  per 32 pairs
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s); fp32; the tiny "
          f"demo model, LoRA rank 16; {args.steps} training steps of each kind, medians\n")  # fmt: skip
    print("| what | seconds | ratio | extra, share of a training step |")
    print("|---|---|---|---|")
    print(f"| DPO step, 32 pairs, without the displacement metrics | {step_off:.4f} | 1.000 | |")
    print(f"| DPO step, 32 pairs, with them | {step_on:.4f} | {step_on / step_off:.3f} | "
          f"{100 * (step_on - step_off) / step_off:.2f}% |")  # fmt: skip
    print(f"| reference pass, {len(data)} pairs, log-probs only | {plain_pass:.2f} | 1.000 | |")
    print(f"| reference pass with the audit's CHES in it | {audited_pass:.2f} | {audited_pass / plain_pass:.3f} | "
          f"{per_step(audited_pass - plain_pass)} once per pair |")  # fmt: skip
    print(f"| + the setup's report (shared prefix; edit distance of the top 20) | {setup_report:.2f} | "
          f"{(audited_pass + setup_report) / plain_pass:.3f} | {per_step(audited_pass - plain_pass + setup_report)} "
          "once per pair |")  # fmt: skip
    print(f"| the audit command's report (every pair's edit distance) | {command_report:.2f} | | |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"\npeak memory (RSS) {peak:.2f} GiB of the machine's {total:.0f} GiB")


if __name__ == "__main__":
    main()
