"""Losses over micro-batches: a mean over each micro-batch's samples, or a sum over counted items.

A loss function returns either the mean loss of its micro-batch (PyTorch's default reduction), or a
pair ``(loss_sum, count)``: the loss summed over ``count`` items (valid tokens, pixels, boxes). The
logical batch's loss is then ``sum of loss_sums / sum of counts`` over every micro-batch and rank,
the quantity a language model's token-level loss over the whole batch is::

    losses = Losses(world_size=1, samples=16, reference=None)
    for part, size in micro_batches:
        loss = losses.add(read_loss(compute_loss(model, part), index), size)   # weighted
        loss.backward()
    mean = losses.settle(...)            # the logical batch's mean loss, counts checked
    losses.rescale(parameters)           # count-weighted: the gradient of sum / count, exactly

The counts of the later micro-batches are not known when the first backward runs, so count-weighted
losses are back-propagated at one weight shared by every micro-batch and rank (``world_size`` over
the previous step's count: gradients the size of a mean's, as a GradScaler expects), and the
accumulated gradient is multiplied once by the ratio of that weight to the true one, before
unscaling, clipping and the update: linear, so exact (docs/guide/batches.md).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["LossValue", "Losses", "check_counts", "ignored_labels_warning", "read_loss"]


@dataclass(frozen=True)
class LossValue:
    """One micro-batch's loss: ``value`` its mean over samples (``count`` None), or its sum over ``count`` items."""

    value: Tensor
    count: Optional[Tensor] = None

    @property
    def count_weighted(self) -> bool:
        return self.count is not None


def _scalar(value: Any) -> bool:
    return isinstance(value, Tensor) and value.numel() == 1


def read_loss(result: Any, index: int) -> LossValue:
    """The loss function's ``result`` for micro-batch ``index``, checked: a scalar tensor, or a pair
    ``(loss_sum, count)`` with a scalar tensor and a number of items (an int or a one-element tensor)."""
    if isinstance(result, (tuple, list)) and len(result) == 2:
        loss, count = result
        if not _scalar(loss):
            raise ValueError(f"the loss of micro-batch {index} is a pair whose first item is {_shape(loss)}, not a "
                             "scalar tensor; return (loss_sum, count): the loss summed over count items")
        if isinstance(count, Tensor):
            if count.dtype == torch.bool:
                raise TypeError(f"the count of micro-batch {index} is a bool tensor ({count.tolist()}), which reads as "
                                "0 or 1 item; return the number of items its loss sums over, such as mask.sum() "
                                "rather than mask.any()")
            if count.numel() != 1:
                raise ValueError(f"the count of micro-batch {index} has shape {tuple(count.shape)}; return the "
                                 "number of items its loss sums over as an int or a one-element tensor")
            count = count.detach().reshape(())
        elif isinstance(count, (int, float)) and not isinstance(count, bool):
            count = torch.tensor(float(count), dtype=torch.float64)
        else:
            raise TypeError(f"the count of micro-batch {index} is {type(count).__name__}; return the number of "
                            "items its loss sums over as an int or a one-element tensor")
        return LossValue(loss.reshape(()), count)
    if not _scalar(result):
        raise ValueError(f"the loss for micro-batch {index} is {_shape(result)}, not a scalar tensor; return the "
                         "mean loss over the micro-batch (reduction='mean'), or (loss_sum, count)")
    return LossValue(result.reshape(()))


#: The label that Hugging Face models and ``F.cross_entropy`` leave out of their mean by default.
IGNORE_INDEX = -100


def ignored_labels_warning(batch: Any, targets: Any = None) -> Optional[str]:
    """What to say when a micro-batch's loss is a plain mean although its labels hold ignored entries:
    the ``labels`` of a mapping batch (Hugging Face's convention), or integer targets, with -100 in them.
    Each micro-batch's mean is then over its own valid labels, and weighting it by samples is not the
    logical batch's mean over its valid labels. None when there is nothing to say."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else targets
    if not isinstance(labels, Tensor) or labels.is_floating_point() or not bool((labels == IGNORE_INDEX).any()):
        return None
    return ("the loss is a plain mean, but the batch's labels hold -100 entries, which a Hugging Face model's loss and "
            "F.cross_entropy leave out of their mean: each micro-batch's mean then runs over its own valid labels, "
            "and the accumulated gradient is not the logical batch's. Return (loss_sum, count): with a Hugging Face "
            "model `count = (batch['labels'] != -100).sum()` (a causal language model shifts its labels: "
            "`batch['labels'][..., 1:]`) and `return model(**batch).loss * count, count`; with F.cross_entropy, "
            "reduction='sum' and the count of valid labels (docs/guide/batches.md)")


def _shape(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def check_counts(counts: Sequence[float], splits: Sequence[int], rank: Optional[int]) -> Optional[ValueError]:
    """The error for a count that is negative, not finite or not a whole number; None if all are."""
    for index, (count, size) in enumerate(zip(counts, splits)):
        if size and not (math.isfinite(count) and count >= 0 and count == int(count)):
            where = "" if rank is None else f" on rank {rank}"
            return ValueError(f"the count of micro-batch {index}{where} is {count}; it must be the number of items "
                              "its loss sums over (a whole number, 0 or more). No optimizer step was taken and the "
                              "model is unchanged")
    return None


class Losses:
    """The weighted losses of one logical batch's micro-batches on this rank.

    ``world_size``: DistributedDataParallel averages gradients over ranks, which the weights undo.
    ``samples``: the logical batch's samples over all ranks. ``reference``: the items of the last
    step's logical batch (None before the first), which sets count-weighted losses' shared weight.
    """

    def __init__(self, world_size: int, samples: int, reference: Optional[float]):
        self.world_size = world_size
        self.samples = samples
        self.reference = reference
        #: Whether this batch's losses are count-weighted; decided by the first micro-batch's.
        self.count_weighted: Optional[bool] = None
        self.values: list[Tensor] = []
        self.counts: list[Tensor] = []
        self.sizes: list[int] = []
        #: The logical batch's items over every rank, once settled (count-weighted only).
        self.total: Optional[float] = None

    @property
    def shared_weight(self) -> float:
        """The weight of every count-weighted micro-batch: world_size over an estimate of the count."""
        return self.world_size / (self.reference if self.reference else self.samples)

    def add(self, loss: LossValue, size: int) -> Tensor:
        """``loss`` of a micro-batch of ``size`` samples (0: a padding micro-batch), weighted for backward."""
        if self.count_weighted is None:
            self.count_weighted = loss.count_weighted
        elif self.count_weighted != loss.count_weighted:
            raise TypeError(f"micro-batch {len(self.values)}'s loss is {'a pair' if loss.count_weighted else 'a mean'} but "
                            f"micro-batch 0's was {'a pair' if self.count_weighted else 'a mean'}; return (loss_sum, count) "
                            "for every micro-batch, or the mean for every one")
        self.values.append(loss.value.detach())
        self.sizes.append(size)
        if loss.count_weighted:
            self.counts.append(loss.count)
            weight = self.shared_weight if size else 0.0
        else:
            weight = size * self.world_size / self.samples
        return loss.value * weight

    def local(self) -> tuple[list[float], list[float]]:
        """Each micro-batch's loss value and count (its samples where not counted): one device sync."""
        stacked = torch.stack([v.to(torch.float64) for v in self.values]
                              + [c.to(self.values[0].device, torch.float64) for c in self.counts]).tolist()
        values = stacked[:len(self.values)]
        counts = stacked[len(self.values):] if self.count_weighted else [float(n) for n in self.sizes]
        return values, counts

    def sums(self, values: list[float], counts: list[float]) -> tuple[float, float]:
        """This rank's (loss summed over its samples or items, samples or items), padding left out."""
        if self.count_weighted:
            return (sum(v for v, n in zip(values, self.sizes) if n),
                    sum(c for c, n in zip(counts, self.sizes) if n))
        return sum(v * n for v, n in zip(values, self.sizes)), float(sum(self.sizes))

    def settle(self, numerator: float, denominator: float) -> float:
        """The logical batch's mean loss from the sums over every rank; raises for a batch without items."""
        if self.count_weighted:
            if denominator <= 0:
                raise ValueError("the logical batch's count is 0: its loss sums over no item (every label ignored?), "
                                 "so it has no mean to follow. No optimizer step was taken and the model is "
                                 "unchanged; skip such batches")
            self.total = denominator
        return numerator / denominator

    def rescale(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Count-weighted: the accumulated gradient was taken at the shared weight; make it the true one's."""
        if not self.count_weighted or self.total is None:
            return
        factor = self.world_size / (self.shared_weight * self.total)
        grads = [p.grad for p in parameters if p.grad is not None]
        if grads and factor != 1.0:
            local = [getattr(g, "_local_tensor", g) for g in grads]  # a sharded (DTensor) gradient's own shard
            torch._foreach_mul_(local, factor)
