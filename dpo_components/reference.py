"""Precomputed reference log-probs: one no-grad pass over the data, cached on disk, then no reference model.

The reference model's log-probs of every pair never change during DPO, so they can be computed once before
training. After that the reference weights can be freed (a full copy of an 8B model is 16 GB in bf16) and each
step skips the reference forward.

The cache is a safetensors file ``reference_logps_<key>.safetensors`` holding four [N] tensors indexed like the
dataset (``chosen_logps``, ``rejected_logps`` as fp32 sums, and the token counts). The key hashes what the values
depend on: the tokenized samples (so dataset, tokenizer, chat template and truncation settings), the reference
checkpoint files' content (every byte hashed) and the dtype; change any of them and the cache is recomputed,
never silently reused.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from dpo_components.data import PreferenceDataset
from dpo_components.losses import SequenceLogProbs
from dpo_components.training import concatenated_logprobs

FIELDS = ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")


def reference_cache_key(
    dataset: PreferenceDataset, checkpoint_digest: str, dtype: torch.dtype, variant: str = ""
) -> str:
    """A short hash of (tokenized dataset, reference checkpoint, dtype, ``variant``: anything else the reference
    depends on, e.g. an NF4-quantized base for QLoRA). ``checkpoint_digest`` is
    ``checkpointing.files_digest`` of the reference checkpoint files (the recipes take it from the run's
    fingerprint, so the files are read once)."""
    digest = hashlib.sha256(dataset.content_hash().encode())
    digest.update(checkpoint_digest.encode())
    digest.update(str(dtype).encode())
    if variant:
        digest.update(variant.encode())
    return digest.hexdigest()[:20]


def reference_variant(cfg: Any) -> str:
    """What else the cached values depend on, from a recipe config: an NF4 base (QLoRA) and the layout (shared
    rows round differently in bf16)."""
    prefix = cfg.get("prefix_sharing", False)
    attention = cfg.get("prefix_sharing_attention", "flex") if prefix else "-"
    return f"quantize_base={cfg.model.get('quantize_base', False)},prefix_sharing={prefix},attention={attention}"


@torch.no_grad()
def compute_reference_logprobs(
    model: nn.Module,
    dataset: PreferenceDataset,
    collate_fn: Callable,
    batch_size: int,
    device: torch.device,
    chunk_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, torch.Tensor]:
    """Per-pair reference log-prob sums and token counts for the whole dataset, indexed like it, on CPU.

    With ``world_size > 1`` (a sharded model under torch.distributed) rank r takes batches r, r + W, ...; every rank
    runs the same number of forwards (a rank short of batches repeats its last one and drops the result), as FSDP
    needs, and the results are summed across ranks so that every rank returns the full table.
    """
    was_training = model.training
    model.eval()
    out = {name: torch.zeros(len(dataset), dtype=torch.float32 if "logps" in name else torch.long) for name in FIELDS}
    starts = list(range(0, len(dataset), batch_size))
    mine = starts[rank::world_size]
    rounds = -(-len(starts) // world_size)  # ceil: the same count on every rank
    for i in tqdm(range(rounds), desc="reference log-probs", dynamic_ncols=True, disable=rank != 0):
        start = mine[min(i, len(mine) - 1)] if mine else starts[0]
        batch = collate_fn([dataset[j] for j in range(start, min(start + batch_size, len(dataset)))])
        logps = concatenated_logprobs(model, {k: v.to(device) for k, v in batch.items()}, chunk_size)
        if i < len(mine):
            for name in FIELDS:
                out[name][batch["index"]] = getattr(logps, name).to("cpu", out[name].dtype)
    if world_size > 1:
        for name in FIELDS:  # each index was filled by exactly one rank, zeros elsewhere
            values = out[name].to(device)
            torch.distributed.all_reduce(values)
            out[name] = values.cpu()
    model.train(was_training)
    return out


def load_or_compute(
    cache_file: str | Path, compute: Callable[[], dict[str, torch.Tensor]] | None
) -> dict[str, torch.Tensor]:
    """Read the cache file if it exists, else compute and write it atomically (temp name + rename)."""
    cache_file = Path(cache_file)
    if cache_file.is_file():
        return load_file(cache_file)
    values = compute()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f".{cache_file.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in values.items()}, tmp)
    os.replace(tmp, cache_file)
    return values


def reference_for_batch(cache: dict[str, torch.Tensor], index: torch.Tensor, device: torch.device) -> SequenceLogProbs:
    """The cached reference log-probs of the pairs ``index`` of a batch."""
    return SequenceLogProbs(*(cache[name][index].to(device) for name in FIELDS))
