"""bn="micro": each micro-batch normalizes with its own statistics, as plain accumulation does;
the running statistics are committed once per logical batch, from the statistics pooled over its
micro-batches (and ranks), as nn.BatchNorm would update them for the whole batch.

    pooled = PooledBatchNorm(names, ranks)
    with intercept_batch_norm(pooled.handle):
        for part in micro_batches:
            pooled.start_micro_batch()
            loss_fn(model(part), ...).backward()
    layers = pooled.commit()                 # running statistics updated once
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator, Optional

import torch
from torch import Tensor

from autobatch.batchnorm.intercept import BatchNormCall, intercept_batch_norm
from autobatch.batchnorm.statistics import (
    LayerStatistics,
    chan_merge,
    check_values_per_channel,
    full_batch_statistics,
    name_of,
    variance,
    with_own_statistics,
)
from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.distributed import Ranks
from autobatch.modes import Micro

__all__ = ["MicroStrategy", "PooledBatchNorm"]

@dataclass
class _Pool:
    """One layer's per-channel count, mean and sum of squared deviations, merged micro-batch by micro-batch."""

    name: str
    eps: float
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    momentum: float
    count: int
    mean: Tensor
    m2: Tensor

    def merge(self, count: int, mean: Tensor, var: Tensor) -> None:
        self.count, self.mean, self.m2 = chan_merge(self.count, self.mean, self.m2, count, mean, var * count)


class PooledBatchNorm:
    """The handlers of bn="micro": each micro-batch normalizes with its own statistics; the running
    statistics are committed once per logical batch from the pooled statistics.

    Also phase 1 of two_pass when the whole batch does not fit: `commit` then returns the
    pooled statistics of the chunks for phase 2.
    """

    def __init__(self, names: dict[int, str], ranks: Optional[Ranks] = None):
        self.names = names
        self.ranks = ranks or Ranks()
        self._pools: list[_Pool] = []
        self._cursor = 0
        self._contributes = True

    def start_micro_batch(self, contributes: bool = True) -> None:
        """``contributes=False``: a padding micro-batch (a rank with fewer samples than splits), left out."""
        self._cursor = 0
        self._contributes = contributes

    def handle(self, call: BatchNormCall) -> Tensor:
        index = self._cursor
        self._cursor += 1
        name = name_of(call, self.names, index)
        # bn="micro" normalizes each micro-batch with its own statistics: the micro-batch is what counts.
        check_values_per_channel(call.values_per_channel, name, "the micro-batch",
                                 " (bn='micro' normalizes each micro-batch with its own statistics): give it a larger "
                                 "micro_batch, or use bn='two_pass', which normalizes with the logical batch's")
        output, mean, invstd = with_own_statistics(call)
        with torch.no_grad():
            mean, var, count = mean.detach(), variance(invstd.detach(), call.eps), call.values_per_channel
            if self._contributes and index == len(self._pools):
                # The first micro-batch's momentum is the full batch's: the layer counted this batch once.
                self._pools.append(_Pool(name, call.eps, call.running_mean, call.running_var, call.momentum,
                                         count, mean, var * count))
            elif self._contributes:
                self._pools[index].merge(count, mean, var)
        return output

    def finish_micro_batch(self) -> None:
        self._cursor = 0

    @staticmethod
    def recompute(call: BatchNormCall) -> Tensor:
        """A call made again during backward by activation checkpointing: the forward's output,
        left out of the pooled statistics (see autobatch.batchnorm.recompute)."""
        return with_own_statistics(call)[0]

    @torch.no_grad()
    def commit(self) -> list[LayerStatistics]:
        """Update the running statistics once, as nn.BatchNorm would for the whole logical batch
        (pooled over ranks too), and return those statistics: phase 2's, for a chunked phase 1."""
        layers = [full_batch_statistics(self.ranks, pool.name, pool.eps, pool.running_mean, pool.running_var,
                                        pool.momentum, pool.count, pool.mean, pool.m2) for pool in self._pools]
        self._pools = []
        return layers


class MicroStrategy(BatchNormStrategy):
    """bn="micro": plain accumulation's statistics, the running statistics of the whole batch."""

    name = Micro.name
    #: This logical batch's pooled statistics: new at each prepare, so a failed step leaves nothing behind.
    _pooled: PooledBatchNorm

    def prepare(self, batch: Any, splits: list[int], chunks: int, total: int) -> tuple[Any, BatchNormStrategy]:
        self._pooled = PooledBatchNorm(self.names, self.ranks)
        return super().prepare(batch, splits, chunks, total)

    def intercept(self) -> ContextManager[None]:
        return intercept_batch_norm(self._pooled.handle)

    @contextlib.contextmanager
    def micro_batch(self, index: int, first_row: int, size: int) -> Iterator[None]:
        self._pooled.start_micro_batch(contributes=size > 0)
        yield
        self._pooled.finish_micro_batch()

    def backward(self, first_row: int, size: int) -> ContextManager[None]:
        return intercept_batch_norm(self._pooled.recompute)

    def finish(self) -> list[LayerStatistics]:
        return self._pooled.commit()
