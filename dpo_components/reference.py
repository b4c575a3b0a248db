"""The reference model of a preference loss, decided once per recipe: :class:`Reference`.

Four kinds, chosen by :func:`build_reference` from the config and the policy:

- ``none``: the loss needs no reference (SimPO, ORPO, CPO, ...): nothing is built, ``logprobs`` is None;
- ``adapters_off``: a LoRA/DoRA policy with its adapters disabled is the base model: no second copy of the weights;
- ``frozen_copy``: a separate model in eval mode without grads (full fine-tuning, or ``reference.checkpointer``);
- ``precomputed`` (``reference.mode: precomputed``): the reference's log-probs of every train and eval pair,
  computed once before training (by one of the two above, then dropped) and cached on disk; each step reads them.

Precomputed log-probs: the reference model's log-probs of every pair never change during DPO, so they can be
computed once before training. After that the reference weights can be freed (a full copy of an 8B model is 16 GB
in bf16) and each step skips the reference forward.

The cache is a safetensors file ``reference_logps_<key>.safetensors`` holding four [N] tensors indexed like the
dataset (``chosen_logps``, ``rejected_logps`` as fp32 sums, and the token counts). The key hashes what the values
depend on: the tokenized samples (so dataset, tokenizer, chat template and truncation settings), the reference
checkpoint files' content (every byte hashed) and the dtype; change any of them and the cache is recomputed,
never silently reused. Beside it, ``reference_logps_<key>.manifest.json`` (written after it) holds its size and
BLAKE2b hash: a cache file changed, cut or left without its manifest (a kill between the two) is named in a warning
and recomputed, never read. Under torch.distributed every call here that reads, computes or writes the cache is a
collective: the ranks split the batches of the pass, rank 0 writes the file, all ranks read the same table.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from safetensors.torch import load_file
from torch import nn
from torchtune.modules.peft import disable_adapter
from torchtune.utils import get_logger
from tqdm import tqdm

from dpo_components.audit import ResponseHiddenSums, audit_report, describe, write_audit
from dpo_components.data import PreferenceDataset
from dpo_components.files import (
    entries_problem,
    read_manifest,
    record_in_manifest,
    remove_stale_temporaries,
    save_tensors,
)
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.losses import PreferenceLoss, SequenceLogProbs
from dpo_components.settings import RecipeSettings

FIELDS = ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")
KINDS = ("none", "adapters_off", "frozen_copy", "precomputed")
log = get_logger("INFO")  # torchtune's logger, as the recipes'


@dataclass
class Reference:
    """What a recipe asks of the reference: its log-probs of a batch, and a model to sample from at eval.

    ``policy`` is set when the policy's adapters off are the reference model (LoRA without a separate reference
    checkpoint; kept with a precomputed cache and for reference-free losses too, for eval samples and their KL);
    ``model`` is a frozen copy; ``cache`` the precomputed log-probs per split (``train``, ``eval``) when ``kind`` is
    ``precomputed``.
    """

    kind: str
    device: torch.device
    policy: nn.Module | None = None
    model: nn.Module | None = None
    cache: dict[str, dict[str, torch.Tensor]] | None = None
    chunk_size: int = 256
    flex_attention: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Reference kind must be one of {KINDS}, got {self.kind!r}")

    def logprobs(self, batch: dict[str, torch.Tensor], split: str = "train") -> SequenceLogProbs | None:
        """The reference's per-pair log-prob sums and counts of ``batch`` (already on the device); None for
        ``none``. No grad; with a cache, the pairs' ``index`` picks the rows of ``split``'s table."""
        if self.kind == "none":
            return None
        if self.kind == "precomputed":
            return reference_for_batch(self.cache[split], batch["index"].cpu(), self.device)
        with torch.no_grad(), self.model_context() as model:
            return concatenated_logprobs(model, batch, self.chunk_size, self.flex_attention)

    @contextlib.contextmanager
    def model_context(self) -> Iterator[nn.Module]:
        """The reference model: the frozen copy, or the policy with its adapters disabled for the block."""
        if self.model is not None:
            yield self.model
        elif self.policy is not None:
            with disable_adapter(self.policy):
                yield self.policy
        else:
            raise RuntimeError(f"this {self.kind} reference keeps no model (a precomputed full-model reference)")

    @property
    def sampling_context(self) -> Callable[[], contextlib.AbstractContextManager[nn.Module]] | None:
        """What eval sampling opens to sample from the reference, or None when no reference model is kept."""
        return self.model_context if (self.model is not None or self.policy is not None) else None

    def describe(self) -> str:
        return {"none": "none (reference-free loss)", "adapters_off": "the base model (adapters off)",
                "frozen_copy": "a frozen copy", "precomputed": "precomputed (cached log-probs)"}[self.kind]  # fmt: skip


def build_reference(
    settings: RecipeSettings,
    loss: PreferenceLoss,
    policy: nn.Module,
    *,
    has_adapters: bool,
    frozen_copy: Callable[[DictConfig | None], nn.Module] | None,
    datasets: dict[str, PreferenceDataset | None],
    collate_fn: Callable,
    fingerprint: dict[str, Any],
    tokenizer: Any = None,
) -> Reference:
    """Decide the reference once, from ``settings.reference`` and the policy.

    ``has_adapters``: the policy is LoRA/DoRA, so without ``reference.checkpointer`` its adapters off are the
    reference. ``frozen_copy(checkpointer_cfg)`` builds a frozen reference model (the recipe knows how: sharded or
    not), from ``reference.checkpointer`` or, given None, from the policy's starting checkpoint. ``datasets``: the
    pairs to precompute, by split (None skipped). ``fingerprint``: the run's (``checkpointing.run_fingerprint``), for
    the checkpoint hashes of the cache key (with :func:`reference_variant` of the settings).

    With ``reference.mode: precomputed`` and every split already cached, no reference model is built at all; the
    train split's data audit (CHES, kept in the cache) is then written to ``<output_dir>/data_audit.json`` and
    summarised in the log (the top pairs' text decoded with ``tokenizer``).
    """
    kwargs = dict(device=settings.device, chunk_size=settings.logprob_chunk_size,
                  flex_attention=settings.flex_attention)  # fmt: skip
    ref = settings.reference
    adapters_off = has_adapters and ref.checkpointer is None
    policy_as_reference = policy if adapters_off else None  # kept in every kind: eval samples and their KL use it
    if not loss.needs_reference:
        return Reference("none", policy=policy_as_reference, **kwargs)
    paths = {}
    if ref.mode == "precomputed":
        digest = fingerprint.get("reference_checkpoint", fingerprint["base_checkpoint"])
        for split, data in datasets.items():
            if data is not None:
                key = reference_cache_key(data, digest, settings.dtype, reference_variant(settings))
                paths[split] = ref.cache_dir / f"reference_logps_{key}.safetensors"
        if _rank_and_world()[0] == 0 and ref.cache_dir.is_dir():  # what a kill during a write left
            remove_stale_temporaries(ref.cache_dir, ".reference_logps_*.tmp*", min_age_s=600)  # shared: by age
        if _cached_on_every_rank(paths.values(), settings.device):  # nothing to compute: build no reference model
            cache = {split: load_file(path) for split, path in paths.items()}
            for split, path in paths.items():
                _log_cache(split, path, reused=True)
            _write_data_audit(settings, datasets.get("train"), cache.get("train"), tokenizer)
            return Reference("precomputed", policy=policy_as_reference, cache=cache, **kwargs)
    live = Reference("adapters_off" if adapters_off else "frozen_copy", policy=policy_as_reference,
                     model=None if adapters_off else frozen_copy(ref.checkpointer), **kwargs)  # fmt: skip
    if ref.mode == "model":
        return live
    cache = {}
    for split, path in paths.items():
        reused = _cached_on_every_rank([path], settings.device)
        compute = partial(compute_reference_logprobs, live, datasets[split], collate_fn, ref.batch_size)
        cache[split] = load_file(path) if reused else _compute_and_write(path, compute)
        _log_cache(split, path, reused)
    _write_data_audit(settings, datasets.get("train"), cache.get("train"), tokenizer)
    return Reference("precomputed", policy=policy_as_reference, cache=cache, **kwargs)  # the model is dropped


def _paired(dataset: PreferenceDataset) -> bool:
    return getattr(dataset, "data_kind", "pairs") == "pairs"


def _write_data_audit(settings: RecipeSettings, dataset: PreferenceDataset | None, table: dict | None,
                      tokenizer: Any) -> None:  # fmt: skip
    """The data audit of the train pairs from the reference pass's CHES (``dpo_components.audit``), on rank 0."""
    if _rank_and_world()[0] != 0 or dataset is None or table is None or not _paired(dataset):
        return
    if "ches" not in table:
        log.info("data audit: this reference cache was made before it (python -m dpo_components.tools.audit "
                 "computes it)")  # fmt: skip
        return
    report = audit_report(dataset, table["ches"].tolist(), tokenizer, every_edit_distance=False)
    write_audit(settings.output_dir / "data_audit.json", report)
    log.info(describe(report))


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _cached_on_every_rank(paths: Any, device: torch.device) -> bool:
    """Every file exists and matches its manifest, as every rank sees it (a collective under torch.distributed).
    A file that exists but does not match is named in a warning (it is then recomputed)."""
    have = True
    for path in paths:
        problem = cache_problem(path)
        if problem and Path(path).exists() and _rank_and_world()[0] == 0:
            log.warning(f"reference cache {path}: {problem}; recomputing it")
        have = have and problem is None
    if not dist.is_initialized():
        return have
    flag = torch.tensor(int(have), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def cache_manifest(path: str | Path) -> Path:
    """The manifest beside a cache file: ``reference_logps_<key>.manifest.json``."""
    return Path(path).with_suffix(".manifest.json")


def cache_problem(path: str | Path) -> str | None:
    """What is wrong with a reference cache file against its manifest, or None when it can be read."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        entries = read_manifest(cache_manifest(path))["files"]
    except FileNotFoundError:
        return f"it has no manifest {cache_manifest(path).name} (a kill before it was written, or an older version)"
    except ValueError as error:
        return f"its manifest is unreadable ({error})"
    if path.name not in entries:
        return f"its manifest {cache_manifest(path).name} does not list it"
    return entries_problem(path.parent, {path.name: entries[path.name]})


def write_cache(path: str | Path, values: dict[str, torch.Tensor]) -> None:
    """Write a cache file atomically, then its manifest."""
    save_tensors(path, values, "the reference cache")
    record_in_manifest(cache_manifest(path), [Path(path).name])


def _compute_and_write(path: Path, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``compute()`` on every rank (sharded forwards need all of them), written by rank 0 (collective)."""
    values = compute()
    if _rank_and_world()[0] == 0:
        write_cache(path, values)
    if dist.is_initialized():
        dist.barrier()
    return values


def _log_cache(split: str, path: Path, reused: bool) -> None:
    if _rank_and_world()[0] == 0:
        log.info(f"reference log-probs for {split}: {'reused' if reused else 'computed'} {path}")


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


def reference_variant(settings: RecipeSettings) -> str:
    """What else the cached values depend on: an NF4 base (QLoRA) and the layout (shared rows round differently in
    bf16)."""
    prefix, packing = settings.prefix_sharing, settings.packing
    attention = ("flex" if settings.flex_attention else "sdpa") if prefix or packing else "-"
    variant = f"quantize_base={settings.quantize_base},prefix_sharing={prefix},attention={attention}"
    return variant + (f",packing_row_tokens={settings.packing_row_tokens}" if packing else "")


@torch.no_grad()
def compute_reference_logprobs(
    reference: Reference, dataset: PreferenceDataset, collate_fn: Callable, batch_size: int
) -> dict[str, torch.Tensor]:
    """Per-pair log-prob sums and token counts of a live ``reference`` (adapters off or a frozen copy) for the whole
    dataset, indexed like it, on CPU; the model in eval mode for the pass. For pairs also ``ches``, the data
    audit's similarity of the two responses (``dpo_components.audit``), from the same forward.

    Under torch.distributed (a sharded model) rank r takes batches r, r + W, ...; every rank runs the same number of
    forwards (a rank short of batches repeats its last one and drops the result), as FSDP needs, and the results are
    summed across ranks so that every rank returns the full table.
    """
    rank, world_size = _rank_and_world()
    out = {name: torch.zeros(len(dataset), dtype=torch.float32 if "logps" in name else torch.long) for name in FIELDS}
    if _paired(dataset):  # the data audit's CHES, from the same forward (dpo_components.audit)
        out["ches"] = torch.zeros(len(dataset), dtype=torch.float32)
    starts = list(range(0, len(dataset), batch_size))
    mine = starts[rank::world_size]
    rounds = -(-len(starts) // world_size)  # ceil: the same count on every rank
    with reference.model_context() as model:
        was_training = model.training
        model.eval()
        for i in tqdm(range(rounds), desc="reference log-probs", dynamic_ncols=True, disable=rank != 0):
            start = mine[min(i, len(mine) - 1)] if mine else starts[0]
            batch = collate_fn([dataset[j] for j in range(start, min(start + batch_size, len(dataset)))])
            batch_on_device = {k: v.to(reference.device) for k, v in batch.items()}
            sink = ResponseHiddenSums() if "ches" in out else None
            logps = concatenated_logprobs(model, batch_on_device, reference.chunk_size, reference.flex_attention, sink)
            if i < len(mine):
                for name in FIELDS:
                    out[name][batch["index"]] = getattr(logps, name).to("cpu", out[name].dtype)
                if sink is not None:
                    out["ches"][batch["index"]] = sink.pair_ches().cpu()
        model.train(was_training)
    if world_size > 1:
        for name in out:  # each index was filled by exactly one rank, zeros elsewhere
            values = out[name].to(reference.device)
            dist.all_reduce(values)
            out[name] = values.cpu()
    return out


def reference_for_batch(cache: dict[str, torch.Tensor], index: torch.Tensor, device: torch.device) -> SequenceLogProbs:
    """The cached reference log-probs of the pairs ``index`` of a batch."""
    return SequenceLogProbs(*(cache[name][index].to(device) for name in FIELDS))
