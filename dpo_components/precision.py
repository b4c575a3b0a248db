"""fp32 master weights for bf16 training, and the guard that says when updates round away.

An Adam(W) update is about ``lr`` in size. A bf16 weight of magnitude 0.02 is stored with a spacing of 1.2e-4, so
at DPO's learning rates (5e-7 to 5e-6) an update applied to the bf16 weight itself is rounded away on every step
and never accumulates: the run logs a loss, saves checkpoints, and trains (almost) nothing. Mixed-precision
training (Micikevicius et al. 2018) keeps an fp32 master copy of every trainable weight; the optimizer steps the
copy (with fp32 gradients and fp32 optimizer state) and the model computes with the copy rounded to bf16.

- One device: :class:`MasterWeights` holds the fp32 copies of the model's bf16 trainable parameters. After each
  backward, :meth:`~MasterWeights.accumulate_grads` adds the bf16 gradients into fp32 ones (so gradient
  accumulation sums in fp32) and frees them; :meth:`~MasterWeights.step` runs the optimizer on the copies and
  writes them, rounded, into the model. Without copies to keep (an fp32 run, or ``master_dtype: bf16``) the
  same calls step the model's own parameters, so a recipe has one code path.
- FSDP2: :func:`fsdp_mixed_precision`, PyTorch's own ``MixedPrecisionPolicy``: the sharded parameters (what the
  optimizer steps, and what distributed checkpoints hold) stay fp32, FSDP all-gathers them as bf16 for compute and
  reduce-scatters the gradients in fp32, as torchtitan does.

Both are what the ``master_dtype`` key (default fp32) turns on when ``dtype`` is bf16. The guard:
:meth:`MasterWeights.step` with ``measure=True`` returns ``unchanged_weight_share``, of a fixed sample of trainable
weights that had a non-zero gradient, the share the step left bit-identical (0 when every update landed; near 1
when bf16 rounding ate them), and :meth:`~MasterWeights.warn_if_updates_round_away` warns at setup when ``lr`` is
below half the storage spacing of most trainable weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)

SAMPLED_PER_TENSOR = 256  # weights per parameter tensor that the guard looks at (fixed indices, drawn once)
WARN_ABOVE = 0.1  # warn at setup when more than this share of the trainable weights would not take an lr-sized step


def _is_subclass(t: torch.Tensor) -> bool:
    """A tensor subclass other than FSDP2's DTensor (e.g. torchao's int8 training weights)."""
    return type(t) not in (torch.Tensor, nn.Parameter, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: an FSDP2 shard's local part, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class MasterWeights:
    """The trainable weights as the optimizer sees them: fp32 copies of a model's lower-precision trainable
    parameters (``master_dtype`` fp32, ``dtype`` bf16), or the parameters themselves when they already are in
    ``master_dtype``.

    Build the optimizer on :attr:`params`, take the gradient norm over them, call :meth:`accumulate_grads` after
    every ``backward()`` and :meth:`step` instead of ``optimizer.step()``. :meth:`state_dict` is what a checkpoint
    must carry besides the model's (rounded) weights for an exact resume; empty without copies.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, nn.Parameter]], master_dtype: torch.dtype,
                 seed: int = 0) -> None:  # fmt: skip
        self._names: list[str] = []
        self._model_params: list[nn.Parameter] = []
        self.params: list[nn.Parameter] = []  # what the optimizer steps
        for name, param in named_parameters:
            if not param.requires_grad:
                continue
            # the same key with activation checkpointing or compile on or off (their wrappers rename modules)
            self._names.append(name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""))
            self._model_params.append(param)
            # tensor subclasses (torchao int8 weight-only training: int8 storage, stochastic rounding) step as they are
            if param.dtype == master_dtype or not param.is_floating_point() or _is_subclass(param):
                self.params.append(param)
            else:
                self.params.append(nn.Parameter(param.detach().to(master_dtype), requires_grad=True))
        self.has_copies = any(m is not p for m, p in zip(self.params, self._model_params))
        generator = torch.Generator().manual_seed(seed)
        # the weights the guard reads: a fixed sample per tensor (none of tensor subclasses, which cannot be indexed)
        self._sample = [None if _is_subclass(p) else torch.randint(0, max(_local(p).numel(), 1),
                        (min(_local(p).numel(), SAMPLED_PER_TENSOR),), generator=generator).to(_local(p).device)
                        for p in self.params]  # fmt: skip

    def __len__(self) -> int:
        return sum(p.numel() for p in self.params)

    def describe(self) -> str:
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in self.params})
        model = sorted({str(p.dtype).removeprefix("torch.") for p in self._model_params})
        if self.has_copies:
            return f"{'/'.join(dtypes)} master copies of the {'/'.join(model)} trainable weights"
        return f"the {'/'.join(dtypes)} trainable weights stepped in place"

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Add the model's gradients of this backward into the master gradients (fp32) and free them."""
        if not self.has_copies:
            return
        for param, master in zip(self._model_params, self.params):
            if master is param or param.grad is None:
                continue
            if master.grad is None:
                master.grad = param.grad.to(master.dtype)
            else:
                master.grad.add_(param.grad)
            param.grad = None

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer, measure: bool = False) -> float | None:
        """``optimizer.step()`` on :attr:`params`, then their values (rounded) into the model's parameters.

        ``measure``: return ``unchanged_weight_share``: of the trainable weights with a non-zero gradient, the share
        the step left bit-identical, estimated from the per-tensor samples (a collective under FSDP2: every rank
        must pass the same ``measure``). It is not 0 in fp32 either: Adam's ``eps`` shrinks the steps of weights
        with tiny gradients (e.g. embedding rows of tokens the batch does not use) below fp32's spacing; compare
        with an fp32 run."""
        before = self._sampled(with_grad=True) if measure else None
        optimizer.step()
        if self.has_copies:
            for param, master in zip(self._model_params, self.params):
                if master is not param:
                    param.copy_(master)
        if before is None:
            return None
        after = self._sampled(with_grad=False)
        # estimated over all weights: per tensor, its size x the sampled shares (with a gradient; and also unchanged)
        counts = torch.zeros(2, dtype=torch.float64, device=self.params[0].device if self.params else "cpu")
        for param, (values, grads), (new_values, _) in zip(self.params, before, after):
            if values is None or len(values) == 0:
                continue
            moved = grads != 0
            scale = _local(param).numel() / len(values)
            counts[0] += scale * (moved & (values == new_values)).sum()
            counts[1] += scale * moved.sum()
        if self.params and isinstance(self.params[0], DTensor) and dist.is_initialized():
            dist.all_reduce(counts)
        unchanged, total = counts.tolist()
        return unchanged / total if total else 0.0

    def _sampled(self, with_grad: bool) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        out = []
        for param, index in zip(self.params, self._sample):
            if index is None:
                out.append((None, None))
                continue
            local = _local(param).detach().reshape(-1)
            grad = _local(param.grad).reshape(-1)[index] if with_grad and param.grad is not None else None
            if with_grad and grad is None:
                grad = torch.zeros(len(index), device=local.device)
            out.append((local[index].clone(), grad))
        return out

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse an optimizer that cannot step the master copies; then :meth:`warn_if_updates_round_away` at the
        optimizer's peak learning rate. The recipes call it once the LR schedule is built."""
        from torchao.optim import CPUOffloadOptimizer

        from dpo_components.settings import ConfigError

        if self.has_copies and isinstance(optimizer, CPUOffloadOptimizer):
            raise ConfigError(
                "torchao's CPUOffloadOptimizer steps only parameters whose gradients arrive through backward hooks; "
                "the fp32 master copies (master_dtype: fp32 with dtype: bf16) get theirs after backward, so it would "
                "step none of its offloaded ones. Use another optimizer (torchao.optim.AdamW8bit also saves "
                "optimizer memory), dtype: fp32, or master_dtype: bf16 (the bf16 weights stepped in place: updates "
                "below their spacing are lost)"
            )
        self.warn_if_updates_round_away(peak_lr(optimizer))

    @torch.no_grad()
    def warn_if_updates_round_away(self, lr: float) -> float:
        """Warn when ``lr`` (about an Adam step) is below half the spacing at which more than a tenth of the
        trainable weights (estimated from the sample) are stored, i.e. when their updates would round away; returns
        that share."""
        lost = total = 0.0  # weighted by tensor size, as above
        for param, index in zip(self.params, self._sample):
            if index is None or not param.is_floating_point() or len(index) == 0:
                continue
            values = _local(param).detach().reshape(-1)[index].abs()
            spacing = (torch.nextafter(values, torch.full_like(values, float("inf"))) - values).float()
            lost += _local(param).numel() * (lr < spacing / 2).float().mean().item()
            total += _local(param).numel()
        share = lost / total if total else 0.0
        if share > WARN_ABOVE:
            dtypes = "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in self.params}))
            log.warning(
                f"lr {lr:g} is below half the {dtypes} spacing of {share:.0%} of the trainable weights: AdamW updates "
                f"(about lr in size) round away and those weights never change. Keep fp32 master weights "
                f"(master_dtype: fp32, the default with dtype: bf16), or raise the learning rate. The logged "
                f"unchanged_weight_share shows how many sampled weights a step left as they were."
            )
        return share

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The master copies by parameter name (empty without copies: the model's weights are the state)."""
        return {n: m.detach() for n, m, p in zip(self._names, self.params, self._model_params) if m is not p}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], where: str = "the checkpoint") -> None:
        """Load :meth:`state_dict`'s copies and write them, rounded, into the model."""
        expected = {n for n, m, p in zip(self._names, self.params, self._model_params) if m is not p}
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(
                f"{where} holds master weights that do not fit this run (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}): was it written with another master_dtype or other trainable parameters?"
            )
        for name, master, param in zip(self._names, self.params, self._model_params):
            if master is not param:
                master.copy_(state[name])
                param.copy_(master)


def trainable_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Give every trainable parameter of ``model`` (built on the meta device: LoRA adapters, DoRA magnitudes) the
    dtype ``dtype``; the frozen ones keep theirs. FSDP2 then holds them (the master weights) in ``dtype``."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad and param.dtype != dtype:
                setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=True))


def fsdp_mixed_precision(dtype: torch.dtype, master_dtype: torch.dtype):
    """FSDP2's ``MixedPrecisionPolicy`` for compute in ``dtype`` over ``master_dtype`` sharded parameters
    (gradients reduced in fp32), or None when the two are the same."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if dtype == master_dtype:
        return None
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``model`` computes in (what a KV cache must hold): FSDP2's mixed-precision ``param_dtype`` where
    one is set (the parameters themselves are the fp32 master weights), else its first floating parameter's."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        param_dtype = model._get_fsdp_state()._mp_policy.param_dtype  # no public accessor in torch 2.13
        if param_dtype is not None:
            return param_dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def peak_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest learning rate the optimizer's groups start from (before a warm-up scales it down)."""
    return max(group.get("initial_lr", group["lr"]) for group in optimizer.param_groups)
