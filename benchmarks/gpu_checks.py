"""GPU checks of the speed paths, printed as a table: prefix sharing and packed rows (with and without prefix
sharing) through FlexAttention equal the standard layout (values and gradients), in fp32 and bf16; one LoRA and
one QLoRA DPO step run and their peak memory.

    python benchmarks/gpu_checks.py          # needs CUDA; benchmarks/gpu_run.sh runs it with the rest
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_components.data import collate_preference_batch  # noqa: E402
from dpo_components.data.packing import collate_packed  # noqa: E402
from dpo_components.data.prefix_sharing import collate_prefix_shared  # noqa: E402
from dpo_components.logprobs import concatenated_logprobs  # noqa: E402
from dpo_components.losses import DPOLoss  # noqa: E402
from dpo_components.tiny.model import TINY_LLAMA_ARGS, lora_tiny_llama, tiny_llama  # noqa: E402

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"  # "cpu" only to try the script out (SDPA, no flex)


def random_pairs(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(0, TINY_LLAMA_ARGS["vocab_size"], (k,), generator=g).tolist()

    pairs = []
    for i in range(n):
        prompt, chosen, rejected = ids(20 + 13 * i), ids(10 + (37 * i) % 90), ids(15 + (23 * i) % 70)
        pairs.append({"prompt_ids": prompt, "chosen_response_ids": chosen, "chosen_labels": chosen,
                      "rejected_response_ids": rejected, "rejected_labels": rejected, "index": i})  # fmt: skip
    return pairs


def logps_and_grads(model, batch):
    model.zero_grad()
    logps = concatenated_logprobs(model, {k: v.to(DEVICE) for k, v in batch.items()})
    (logps.chosen_logps.sum() - 0.5 * logps.rejected_logps.sum()).backward()
    return logps, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


LAYOUTS = {
    "prefix sharing": lambda pairs: collate_prefix_shared(pairs, pad_to_multiple_of=128),
    "packed rows": lambda pairs: collate_packed(pairs, pad_to_multiple_of=128, share_prompt=False, row_tokens=384),
    "packed + prefix": lambda pairs: collate_packed(pairs, pad_to_multiple_of=128, share_prompt=True, row_tokens=384),
}


def check_prefix_sharing(dtype: torch.dtype, layout: str = "prefix sharing") -> str:
    torch.manual_seed(0)
    model = tiny_llama().to(DEVICE, dtype)
    pairs = random_pairs(6)
    standard, standard_grads = logps_and_grads(model, collate_preference_batch(pairs))
    shared, shared_grads = logps_and_grads(model, LAYOUTS[layout](pairs))
    value_err = max((shared.chosen_logps - standard.chosen_logps).abs().max().item(),
                    (shared.rejected_logps - standard.rejected_logps).abs().max().item())  # fmt: skip
    scale = standard.chosen_logps.abs().max().item()
    grad_err = max(((shared_grads[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in standard_grads.items())
    tolerance = (1e-3, 1e-4) if dtype == torch.float32 else (5e-2, 3e-2)  # abs logp (sums ~500), rel grad
    if value_err > tolerance[0] or grad_err > tolerance[1]:
        raise AssertionError(f"{dtype}: logp diff {value_err:.2e}, grad diff {grad_err:.2e} over {tolerance}")
    attention = "FlexAttention" if DEVICE == "cuda" else "SDPA"
    return (f"| {layout} ({attention}) vs standard, {dtype} | max abs logp diff {value_err:.2e} (of {scale:.0f})"
            f" | max rel grad diff {grad_err:.2e} |")  # fmt: skip


def check_lora_step(quantize_base: bool) -> str:
    torch.manual_seed(0)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.device(DEVICE):
        model = lora_tiny_llama(["q_proj", "v_proj"], lora_rank=8, quantize_base=quantize_base).to(torch.bfloat16)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    batch = {k: v.to(DEVICE) for k, v in collate_prefix_shared(random_pairs(4)).items()}
    start = time.perf_counter()
    policy = concatenated_logprobs(model, batch)
    out = DPOLoss(beta=0.1)(policy, _detached(policy))
    out.losses.mean().backward()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else float("nan")
    grads = sum(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    if grads == 0 or abs(out.losses.mean().item() - math.log(2)) > 1e-3:  # B = 0 at init: policy = reference
        raise AssertionError(f"loss {out.losses.mean().item()}, {grads} LoRA gradients")
    kind = "QLoRA (NF4)" if quantize_base else "LoRA"
    return (f"| {kind} bf16 DPO step, prefix sharing | loss {out.losses.mean().item():.4f}, "
            f"{grads} LoRA grads | {time.perf_counter() - start:.2f} s, peak {peak:.0f} MiB |")  # fmt: skip


def _detached(logps):
    return type(logps)(*(t.detach() for t in (logps.chosen_logps, logps.rejected_logps, logps.chosen_tokens,
                                                 logps.rejected_tokens)))  # fmt: skip


def main() -> None:
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}")
    print("| check | result | |\n|---|---|---|")
    failed = 0
    layouts = [lambda d=d, layout=layout: check_prefix_sharing(d, layout) for layout in LAYOUTS
               for d in (torch.float32, torch.bfloat16)]  # fmt: skip
    for check in (*layouts, lambda: check_lora_step(False), lambda: check_lora_step(True)):
        try:
            print(check(), flush=True)
        except Exception as error:  # report and go on: each check is independent
            print(f"| FAILED | {type(error).__name__}: {str(error)[:300]} | |", flush=True)
            failed += 1
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
