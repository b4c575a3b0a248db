"""Attention one document at a time against SDPA with a dense mask, for prefix-shared and packed rows (CPU).

    OMP_NUM_THREADS=1 python benchmarks/document_attention.py            # the dpo_throughput CPU preset's model
    OMP_NUM_THREADS=1 python benchmarks/document_attention.py --dtype bf16

One process, one LoRA model (the ``dpo_throughput.py`` CPU preset: 22M-param Llama, rank-16 LoRA on q/k/v/o and
the MLP, base frozen), the same batches of ``--pairs`` random-length pairs (prompt 128-384 tokens, responses
64-320 each, random token ids) in four layouts: shared rows ([prompt | chosen | rejected], one per pair),
packed shared rows in rows of up to 2048 and of up to 8192 tokens, and packed unshared documents. Each layout
runs a policy forward and backward (``concatenated_logprobs``) through

    dense        SDPA with the [R, L, L] boolean mask: every score of a row, the masked ones too
    by_document  ``dpo_components.models.document_attention``: two SDPA calls per document, no masked score

(the same model object: ``dense`` is the model as torchtune builds it, ``by_document`` after
``document_attention``). Printed: seconds per step (median over ``--steps`` after one warm-up), the ratio of
by-document to dense tokens/s, the largest difference between their log-probs, the padding share, and the share
of attention scores the dense mask computes that are masked (its waste).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
from dpo_throughput import LORA, PRESETS  # the same directory: the throughput benchmark's model
from torchtune.models.llama3_2 import lora_llama3_2
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from dpo_components.data.packing import collate_packed
from dpo_components.data.prefix_sharing import collate_prefix_shared
from dpo_components.data.segments import PADDING
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.models.attention_masks import attention_mask
from dpo_components.models.document_attention import document_attention

LAYOUTS = {
    "shared rows": lambda pairs: collate_prefix_shared(pairs),
    "packed shared, rows <= 2048": lambda pairs: collate_packed(pairs, share_prompt=True, row_tokens=2048),
    "packed shared, rows <= 8192": lambda pairs: collate_packed(pairs, share_prompt=True, row_tokens=8192),
    "packed unshared, rows <= 2048": lambda pairs: collate_packed(pairs, share_prompt=False, row_tokens=2048),
}


def random_pairs(n: int, rng: random.Random) -> list[dict]:
    def ids(k: int) -> list[int]:
        return [rng.randrange(32768) for _ in range(k)]

    pairs = []
    for i in range(n):
        chosen, rejected = ids(rng.randint(64, 320)), ids(rng.randint(64, 320))
        pairs.append({"prompt_ids": ids(rng.randint(128, 384)), "chosen_response_ids": chosen,
                      "chosen_labels": chosen, "rejected_response_ids": rejected, "rejected_labels": rejected,
                      "index": i})  # fmt: skip
    return pairs


def step(model: torch.nn.Module, batch: dict, dtype: torch.dtype) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logps = concatenated_logprobs(model, batch, chunk_size=256)
    (logps.chosen_logps - logps.rejected_logps).sum().backward()
    return time.perf_counter() - start, logps.chosen_logps.detach()


def masked_share(batch: dict) -> float:
    """Of the scores the dense mask makes SDPA compute (R x L x L), the share it masks out."""
    rows, length = batch["segments"].shape
    allowed = attention_mask(batch["segments"], documents=batch.get("documents"))
    real = batch["segments"] != PADDING
    return 1 - int((allowed & real[:, :, None]).sum()) / (rows * length * length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step (the CPU preset's batch_size)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    dense = lora_llama3_2(**PRESETS["cpu"]["model"], **LORA, apply_lora_to_output=False)
    set_trainable_params(dense, get_adapter_params(dense))
    by_document = document_attention(copy.deepcopy(dense))
    rng = random.Random(0)
    batches = [random_pairs(args.pairs, rng) for _ in range(args.steps + 1)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.dtype}, {args.pairs} pairs/step, "
          f"{args.steps} timed steps after 1 warm-up")  # fmt: skip
    print("| layout | rows x L | padding | masked share of dense scores | dense s/step | by-document s/step "
          "| x dense | max abs diff of log-probs |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, collate in LAYOUTS.items():
        times: dict[str, list[float]] = {"dense": [], "by_document": []}
        diff, shape, padding, waste = 0.0, [], [], []
        for i, pairs in enumerate(batches):
            batch = collate(pairs)
            seconds_dense, logps_dense = step(dense, batch, dtype)
            seconds_doc, logps_doc = step(by_document, batch, dtype)
            if i:  # the first step warms up
                times["dense"].append(seconds_dense)
                times["by_document"].append(seconds_doc)
            diff = max(diff, float((logps_dense - logps_doc).abs().max()))
            shape.append("x".join(map(str, batch["input_ids"].shape)))
            padding.append(float((batch["segments"] == PADDING).float().mean()))
            waste.append(masked_share(batch))
        d, b = statistics.median(times["dense"]), statistics.median(times["by_document"])
        print(f"| {name} | {', '.join(shape[1:])} | {statistics.mean(padding[1:]):.1%} "
              f"| {statistics.mean(waste[1:]):.0%} | {d:.3f} | {b:.3f} | {d / b:.2f} | {diff:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
