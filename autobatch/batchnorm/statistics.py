"""Per-channel BatchNorm statistics: what a layer is, what it computed, and how statistics merge.

    layer = full_batch_statistics(ranks, name, eps, running_mean, running_var, momentum, count, mean, m2)
    output = normalize(call, layer)          # the call's input with those statistics, no gradient through them
    state = BatchNormState(layers)           # running statistics snapshot: counted once, restored on error
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from autobatch.batchnorm.intercept import BatchNormCall
from autobatch.distributed import Ranks

__all__ = ["LayerStatistics", "batch_norm_modules", "batch_norm_names", "chan_merge",
           "channel_means", "check_values_per_channel", "full_batch_statistics", "local_statistics", "name_of",
           "normalize", "uses_batch_statistics", "variance", "with_own_statistics"]


def batch_norm_modules(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of ``model`` (SyncBatchNorm and subclasses included)."""
    return [module for module in model.modules() if isinstance(module, _BatchNorm)]


def batch_norm_names(model: nn.Module) -> dict[int, str]:
    """Qualified layer names keyed by the id of each BatchNorm's weight and running_mean, for messages."""
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            for tensor in (module.weight, module.running_mean):
                if tensor is not None:
                    names[id(tensor)] = name or type(module).__name__
    return names


def uses_batch_statistics(modules: list[_BatchNorm]) -> bool:
    """Whether any layer will normalize with batch statistics (training mode, or no running statistics)."""
    return any(module.training or module.running_mean is None for module in modules)


def name_of(call: BatchNormCall, names: dict[int, str], index: Optional[int]) -> str:
    """The layer's qualified name; for a functional call, its place in the forward (``index``)."""
    for tensor in (call.weight, call.running_mean):
        if tensor is not None and id(tensor) in names:
            return names[id(tensor)]
    return "a functional batch_norm call" if index is None else f"batch_norm call #{index}"


def channel_means(input: Tensor, dtype: torch.dtype, per_sample: bool = False) -> Tensor:
    """Per-channel means of a BatchNorm input (N, C, ...): over everything but the channels, or with
    ``per_sample`` over the positions of each sample only, shape (N, C)."""
    dims = list(range(2, input.dim())) if per_sample else [0] + list(range(2, input.dim()))
    return input.to(dtype) if not dims else input.mean(dims, dtype=dtype)


@dataclass
class LayerStatistics:
    """Full-batch statistics of one BatchNorm call, recorded in phase 1."""

    name: str
    mean: Tensor
    invstd: Tensor
    var: Tensor
    eps: float
    values_per_channel: int
    #: Phase 1's per-sample channel means (samples, C) of this rank's samples from ``first_row`` on;
    #: None where phase 1 ran in chunks (each normalized with its own statistics, so the micro-batches
    #: cannot be compared with it), which leaves the micro-batches unchecked.
    sample_means: Optional[Tensor] = None
    first_row: int = 0


def check_values_per_channel(count: float, name: str, batch: str = "the whole logical batch", hint: str = "") -> None:
    # The same check F.batch_norm makes, so a bad full batch fails as it would without autobatch.
    if count <= 1:
        raise ValueError(f"BatchNorm layer {name!r} gets 1 value per channel for {batch}; "
                         f"training BatchNorm needs more than one{hint}")


def chan_merge(count_a: float, mean_a: Tensor, m2_a: Tensor, count_b: float, mean_b: Tensor,
               m2_b: Tensor) -> tuple[float, Tensor, Tensor]:
    """Chan et al.'s merge of two sets' per-channel count, mean and sum of squared deviations."""
    count = count_a + count_b
    delta = mean_b - mean_a
    return count, mean_a + delta * (count_b / count), m2_a + m2_b + delta.square() * (count_a * count_b / count)


def variance(invstd: Tensor, eps: float) -> Tensor:
    # Recovered in float64 so that a variance far below eps keeps its digits.
    return (invstd.double().pow(-2) - eps).clamp_(min=0).to(invstd.dtype)


@torch.no_grad()
def update_running(running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                    mean: Tensor, var: Tensor, count: float) -> None:
    """nn.BatchNorm's update for one batch of ``count`` values per channel with biased ``var``."""
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    if running_var is not None:
        unbiased = var * (count / max(count - 1, 1))
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def local_statistics(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a BatchNorm input (in float32 at least)."""
    precise = x if x.dtype in (torch.float32, torch.float64) else x.float()
    # BatchNorm's own kernel: on CPU several times faster than var_mean over (N, H, W).
    _, mean, invstd = torch.ops.aten.native_batch_norm(precise, None, None, None, None, True, 0.0, eps)
    return mean, variance(invstd, eps)


@torch.no_grad()
def full_batch_statistics(ranks: Ranks, name: str, eps: float, running_mean: Optional[Tensor],
                          running_var: Optional[Tensor], momentum: float, count: float, mean: Tensor,
                          m2: Tensor) -> LayerStatistics:
    """One layer's statistics over this rank's (count, mean, m2) and every other rank's, with the
    running statistics updated from them once."""
    count, mean, m2 = ranks.merge(count, mean, m2)
    check_values_per_channel(count, name)
    var = m2 / count
    update_running(running_mean, running_var, momentum, mean, var, count)
    return LayerStatistics(name, mean, (var + eps).rsqrt(), var, eps, int(count))


def normalize(call: BatchNormCall, layer: LayerStatistics) -> Tensor:
    """``call``'s input normalized with ``layer``'s statistics (no gradient through them)."""
    return torch.batch_norm(call.input, call.weight, call.bias, layer.mean, layer.var, False, 0.0, layer.eps,
                            torch.backends.cudnn.enabled)


def with_own_statistics(call: BatchNormCall) -> tuple[Tensor, Tensor, Tensor]:
    """Output, mean and invstd of ``call`` normalized with its own batch's statistics; running ones untouched."""
    return torch.ops.aten.native_batch_norm(call.input, call.weight, call.bias, None, None, True, 0.0, call.eps)
