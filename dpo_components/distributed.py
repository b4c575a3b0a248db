"""What the FSDP2 recipes share: the process group around a run, rank-0 work sent to every rank, each rank's slice
of a global batch, as many micro-batches on every rank, the sharded model build, and the LoRA starting weights
that do not depend on the world size.

Every function here is a collective where it says so: all ranks must call it, in the same order.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
from torchtune import modules, training
from torchtune.modules.peft import DoRALinear, LoRALinear
from torchtune.utils import get_logger

from dpo_components.data.micro_batches import split_to_count
from dpo_components.settings import ConfigError

log = get_logger("INFO")


@contextlib.contextmanager
def process_group(device: str, timeout_seconds: float = 1800) -> Iterator[None]:
    """The process group around an FSDP2 recipe's run (torchrun starts the processes): NCCL for ``device`` cuda,
    gloo for CPU. A collective that waits longer than ``timeout_seconds`` fails instead of hanging; the default, 30
    minutes, leaves time for rank 0 to write a consolidated checkpoint of a large model while the others wait.

    An error on one rank is printed and ends that rank at once, with no barrier and no teardown: the other ranks may
    sit in a collective this rank will never join, and torchrun stops them. After a run every rank meets at a
    barrier before the group goes away (gloo aborts on an early teardown).

    Started without torchrun (``python recipes/<recipe>.py --config ...``: no ``RANK`` in the environment), the
    run is a group of one process."""
    backend, timeout = "nccl" if device == "cuda" else "gloo", timedelta(seconds=timeout_seconds)
    if "RANK" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    except BaseException:
        log.error(f"rank {dist.get_rank()} failed:\n{traceback.format_exc()}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    dist.barrier()
    dist.destroy_process_group()


def from_rank_zero(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run on rank 0 only (it reads whole files) and sent to every rank; an error raised
    there is raised on every rank, so all of them stop with the same message (collective)."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (fn(*args, **kwargs), None)
        except Exception as error:
            box[0] = (None, error)
    dist.broadcast_object_list(box, src=0)
    value, error = box[0]
    if error is not None:
        raise error
    return value


def rank_slice(order: list[int], batch_size: int) -> list[int]:
    """This rank's sample order: its ``batch_size`` slice of every global batch (``batch_size`` x world size) of
    ``order``, which must be the same on every rank. The ranks together see exactly what one process with the global
    batch would."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    global_batch = batch_size * world_size
    usable = len(order) // global_batch * global_batch
    start = rank * batch_size
    return [order[g + start + i] for g in range(0, usable, global_batch) for i in range(batch_size)]


def agree_micro_batches(micro_batches: list[list[int]], device: torch.device) -> list[list[int]]:
    """This rank's micro-batches of a step (:func:`dpo_components.data.micro_batches.plan_micro_batches`), split
    until every rank has as many as the rank with the most: each is a forward and a backward through the sharded
    model, so all ranks must run the same number (collective)."""
    count = torch.tensor([len(micro_batches)], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return split_to_count(micro_batches, int(count.item()))


def shard_and_load(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    reshard: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> None:
    """Shard a model built on the meta device (FSDP2 ``fully_shard`` per transformer layer, then the root), compute
    its RoPE buffers and load the full ``state`` (every key, strictly) into the shards, cast to each parameter's
    dtype. ``mp_policy``: FSDP2's mixed precision (fp32 sharded parameters, bf16 compute:
    :func:`~dpo_components.precision.fsdp_mixed_precision`)."""
    if dist.get_world_size() == 1 and any(isinstance(p, NF4Tensor) for p in model.parameters()):
        # torch 2.13's FSDP2 skips the all-gather on one rank and copies only the first of the three tensors NF4
        # all-gathers (ValueError: not enough values to unpack, in torchao's fsdp_post_all_gather)
        raise ConfigError(
            "QLoRA (an NF4 base) under FSDP needs 2 or more ranks: PyTorch's FSDP2 cannot run NF4 weights on one "
            "rank. On one GPU use recipes/lora_dpo_single_device.py, which takes the same config keys."
        )
    # torchtune's training.shard_model, with FSDP2's mixed-precision policy (torchtune 0.6.1 does not pass one)
    fsdp_kwargs: dict[str, Any] = {"reshard_after_forward": reshard}
    if mp_policy is not None:
        fsdp_kwargs["mp_policy"] = mp_policy
    for module in reversed(list(model.modules())):
        if isinstance(module, modules.TransformerSelfAttentionLayer):
            fully_shard(module, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    with training.set_default_dtype(dtype), device:
        for module in model.modules():
            if hasattr(module, "rope_init"):  # buffers the meta device could not compute
                module.rope_init()
    training.load_from_full_model_state_dict(model, state, device, strict=True)
    training.validate_no_params_on_meta_device(model)


def initial_adapter_state(model: nn.Module, base_state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The LoRA/DoRA starting weights of ``model`` (built on the meta device), full-size, on CPU.

    ``lora_a`` is Kaiming-uniform (torchtune's and PEFT's init) drawn from a generator seeded with ``seed`` in module
    order, ``lora_b`` is zero, a DoRA ``magnitude`` is the row norm of the base weight (NF4-rounded for QLoRA, as
    the quantized base is what DoRA scales). Every rank computes the same values for any world size, so 2 ranks
    start where 1 process starts (torchtune's distributed recipe initialises each rank's shard from that rank's RNG).
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if not isinstance(module, (LoRALinear, DoRALinear)):
            continue
        prefix = state_dict_key(model, name) + "." if name else ""
        lora_a = torch.empty(module.lora_a.weight.shape, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
        state[f"{prefix}lora_a.weight"] = lora_a
        state[f"{prefix}lora_b.weight"] = torch.zeros(module.lora_b.weight.shape)
        if isinstance(module, DoRALinear):
            weight = base_state[f"{prefix}weight"].float()
            if getattr(module, "_quantize_base", False):
                weight = to_nf4(weight.to(module.lora_a.weight.dtype)).get_original_weight().float()
            state[f"{prefix}magnitude"] = torch.linalg.norm(weight, dim=1)
    return state


def state_dict_key(model: nn.Module, name: str) -> str:
    """The state-dict key of the submodule or parameter at module path ``name``: the same, except inside a module
    that renames its keys and says so with DCP's ``_fqn_modifiers`` (Llama 3.2 Vision's fusion layers and
    embedding drop ``layer.`` / ``embedding.``: ``dpo_components.vision.model``)."""
    kept, module = [], model
    for part in name.split("."):
        if part not in getattr(module, "_fqn_modifiers", dict)().values():
            kept.append(part)
        module = getattr(module, part)
    return ".".join(kept)
