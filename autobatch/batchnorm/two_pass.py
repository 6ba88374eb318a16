"""bn="two_pass": a no-grad forward of the whole logical batch records every BatchNorm layer's
statistics (phase 1), then each micro-batch normalizes with them and back-propagates through the
projected backward (autobatch.batchnorm.full_batch), with phase 1's random draws replayed.

    two_pass = TwoPassStrategy(layers, names, ranks, micro, phase1_memory_format=None)
    batch, norm = two_pass.prepare(batch, splits, 1, total)     # phase 1
    ...                                                 # then as every strategy (autobatch.batchnorm.strategy)
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, ContextManager, Iterator, Optional

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from autobatch.batchnorm.full_batch import FEW_VALUES_PER_CHANNEL, FullBatchStatistics, StopForward
from autobatch.batchnorm.intercept import intercept_batch_norm
from autobatch.batchnorm.layout import Phase1Layout
from autobatch.batchnorm.micro import PooledBatchNorm
from autobatch.batchnorm.randomness import RandomDraws
from autobatch.batchnorm.recompute import quiet_checkpoint
from autobatch.batchnorm.rounding import measured_rounding
from autobatch.batchnorm.statistics import LayerStatistics, uses_batch_statistics
from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.distributed import Ranks
from autobatch.microstep import MicroStep
from autobatch.modes import TwoPass
from autobatch.plan import Plan
from autobatch.split import balanced_splits
from autobatch.stages import Stage, entered

__all__ = ["TwoPassStrategy"]

log = logging.getLogger(__name__)

#: Below this many samples per micro-batch, two_pass (the projected backward) trained a convolutional network
#: to a worse loss than plain accumulation on real data; at this many it was ahead (docs/benchmarks.md).
SMALL_MICRO_BATCH = 4


class TwoPassStrategy(BatchNormStrategy):
    """bn="two_pass": full-batch statistics in every micro-batch; running statistics updated once."""

    name = TwoPass.name
    gradient = "projected backward: close to the full batch's gradient, not equal to it"

    def __init__(self, layers: list[_BatchNorm], names: dict[int, str], ranks: Ranks, micro: MicroStep,
                 phase1_memory_format: Optional[torch.memory_format] = None, stop_early: bool = True):
        super().__init__(layers, names, ranks)
        self.micro = micro
        self.handler = FullBatchStatistics(names, ranks, stop_early)
        #: Phase 1's dropout and stochastic-depth masks, replayed to the micro-batches.
        self.draws = RandomDraws()
        self.layout = Phase1Layout(phase1_memory_format)
        #: The running logical batch's micro-batches.
        self.splits: list[int] = []
        self._total = 0
        #: Whether the running micro-batch replays phase 1's draws (and so its backward recomputes them).
        self._replaying = False
        #: Why the precise backward, wanted where it can run, cannot run with these processes (the plan says so).
        self.not_precise: Optional[str] = None

    def gradient_of(self, plan: Plan) -> str:
        words = super().gradient_of(plan)
        if words == self.gradient and self.not_precise is not None:
            return f"{words} (precise cannot run: {self.not_precise})"
        return words

    # -- the planner's questions ----------------------------------------------------------------

    def needs_phase1(self) -> bool:
        return uses_batch_statistics(self.layers)

    def trial_phase1(self, batch: Any, chunks: int) -> None:
        self.draws.clear()
        # A two_pass of this rank alone: trials must not wait on other ranks' collectives.
        self._phase1(batch, FullBatchStatistics(self.names), chunks, measure_layout=False)

    def take_draw_bytes(self) -> int:
        size = self.draws.nbytes
        self.draws.clear()
        return size

    # -- one logical batch -----------------------------------------------------------------------

    def begin(self, batch: Any, splits: list[int], total: int) -> Any:
        """A logical batch's start: ``batch`` on the device, phase 1's draws forgotten, its splits kept (the
        agreement check's rounding runs on the first micro-batch's rows). Returns the batch on the device."""
        batch = self.micro.batches.to(batch, self.micro.device)
        self.draws.clear()
        self.splits, self._total, self._batch = splits, total, batch
        return batch

    def prepare(self, batch: Any, splits: list[int], chunks: int, total: int) -> tuple[Any, BatchNormStrategy]:
        batch = self.begin(batch, splits, total)
        self._phase1(batch, self.handler, chunks)
        self._warn_thin_layers()
        self._warn_chunks(chunks)
        return batch, self

    def intercept(self) -> ContextManager[None]:
        return intercept_batch_norm(self.handler.apply)

    @contextlib.contextmanager
    def micro_batch(self, index: int, first_row: int, size: int) -> Iterator[None]:
        self.handler.start_micro_batch((first_row, first_row + size) if size else None)
        # A padding micro-batch (no samples of its own, weight 0) draws afresh.
        self._replaying = bool(size and self.draws.recorded)
        with self.draws.replay(first_row, size) if self._replaying else contextlib.nullcontext():
            yield
        self.handler.finish_micro_batch()

    def backward(self, first_row: int, size: int) -> ContextManager[None]:
        stack = contextlib.ExitStack()
        stack.enter_context(intercept_batch_norm(self.handler.recompute))
        if self._replaying:
            stack.enter_context(self.draws.recompute())
        return stack

    def check(self) -> Optional[BaseException]:
        # One process: the measuring forwards are this rank's alone, and must meet no other rank's collectives.
        return self.handler.check(None if self.ranks.active else self._measured_rounding)

    def _measured_rounding(self) -> list[float]:
        """The model's own rounding at each BatchNorm call, on the first micro-batch's rows (the agreement check's
        allowances; autobatch.batchnorm.rounding)."""
        size = self.splits[0]
        part = self.micro.batches.take(self._batch, size)
        replay = (lambda: self.draws.replay(0, size)) if self.draws.recorded else contextlib.nullcontext
        return measured_rounding(self.micro, part, self.handler.layers, replay)

    def non_finite_culprit(self) -> Optional[str]:
        found = self.handler.non_finite_samples()
        if found is None:
            return None
        return (f"in phase 1, the input of BatchNorm layer {found[0]!r} is NaN or infinite for samples {found[1]} "
                "of the logical batch, and its statistics carry that into every micro-batch")

    def finish(self) -> list[LayerStatistics]:
        return self.handler.layers

    # -- phase 1 ---------------------------------------------------------------------------------

    def _phase1(self, batch: Any, handler: FullBatchStatistics, chunks: int, measure_layout: bool = True) -> None:
        """A no-grad forward of the whole batch that records every BatchNorm's statistics and updates
        running statistics. In ``chunks`` > 1 pieces, the statistics are pooled. The first one
        (``measure_layout``) times the memory formats it may run in (autobatch.batchnorm.layout)."""
        with entered(Stage.PHASE1), torch.no_grad(), self.micro.autocast(), quiet_checkpoint():
            size = self.micro.batches.size(batch)
            sizes = balanced_splits(size, -(-size // chunks))
            if measure_layout:
                self.measure_layout(batch if chunks == 1 else self.micro.batches.split(batch, sizes)[0], handler.ranks)
            batch = self.layout.convert(batch)
            if chunks == 1:
                self._whole_phase1(batch, handler)
            else:
                self._chunked_phase1(batch, sizes, handler)

    def _whole_phase1(self, batch: Any, handler: FullBatchStatistics) -> None:
        handler.start_phase1(self.micro.batches.size(batch))
        complete = True
        with intercept_batch_norm(handler.record), self.draws.record(0, self.micro.batches.size(batch)):
            try:
                self.micro.forward(batch)
            except StopForward:
                complete = False
        handler.finish_phase1(complete)

    def _chunked_phase1(self, batch: Any, sizes: list[int], handler: FullBatchStatistics) -> None:
        pooled = PooledBatchNorm(self.names, handler.ranks)
        with intercept_batch_norm(pooled.handle):
            for index, chunk in enumerate(self.micro.batches.split(batch, sizes)):
                pooled.start_micro_batch()
                with self.draws.record(sum(sizes[:index]), sizes[index]):
                    self.micro.forward(chunk)
        handler.layers = pooled.commit()

    def measure_layout(self, batch: Any, ranks: Ranks) -> None:
        """Phase 1's memory format, timed on ``batch`` the first time (autobatch.batchnorm.layout)."""
        with torch.no_grad(), self.micro.autocast(), quiet_checkpoint():
            self.layout.measure(self.micro.module, self.micro.forward, batch, self.micro.device, ranks)

    # -- phase 2 ---------------------------------------------------------------------------------

    def _warn_chunks(self, chunks: int) -> None:
        """Once per wrap: phase 1 in chunks gives statistics that are not the whole batch's."""
        if chunks == 1 or not self.micro.once.first("phase 1 in chunks"):
            return
        log.warning("two_pass's phase 1 does not fit the memory budget in one piece and runs in %d chunks, each "
                    "normalized with its own statistics: the BatchNorm statistics are then only roughly the whole "
                    "batch's. Raise memory_budget so that phase 1 fits, or use bn='exact' for the whole batch's step",
                    chunks)

    def _warn_thin_layers(self) -> None:
        """Once per wrap, one line each: micro-batches under SMALL_MICRO_BATCH samples, and layers with
        few values per channel in a micro-batch (their list at INFO)."""
        if not self.micro.once.first("thin layers"):
            return
        smallest = min([n for n in self.splits if n] or self.splits)
        if smallest < SMALL_MICRO_BATCH:
            log.warning("two_pass with micro-batches of %d samples: with so few, a convolutional network trained to a "
                        "worse loss than plain accumulation on real data (docs/benchmarks.md); prefer %d or more per "
                        "micro-batch, or TwoPass(precise=True), whose gradient is the full batch's", smallest, SMALL_MICRO_BATCH)
        thin = sorted(self.handler.thin_layers(smallest, self._total), key=lambda layer: layer[1])
        if thin:
            layers = "1 BatchNorm layer sees" if len(thin) == 1 else f"{len(thin)} BatchNorm layers see"
            log.warning("%s fewer than %d values per channel in a micro-batch (fewest: %r, %d): two_pass takes "
                        "the backward's means from so few values that those gradients are only roughly the full "
                        "batch's; a larger micro_batch helps", layers, FEW_VALUES_PER_CHANNEL, thin[0][0], thin[0][1])
            log.info("autobatch: values per channel in a micro-batch: %s",
                     ", ".join(f"{name} ({values})" for name, values in thin))
