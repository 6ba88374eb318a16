"""bn=TwoPass(precise=True): two_pass with the full batch's exact backward, segment by segment.

Phase 1 runs the whole batch through the model's traced graph (autobatch.batchnorm.segments),
records every BatchNorm's statistics as two_pass does, and keeps the tensors at the cuts. Each
micro-batch's loss is taken on its rows of phase 1's output, which is the full batch's; the last
micro-batch's backward then goes down the graph one segment at a time::

    precise = PreciseTwoPassStrategy(layers, names, ranks, micro)
    batch = precise.prepare(batch, splits, 1, total)     # phase 1, boundaries kept
    ...                                          # then as every strategy (autobatch.batchnorm.strategy)

Where the graph cannot be had (torch.fx cannot trace the model, the loss calls it twice, phase 1
runs in chunks, several processes), the step runs as plain two_pass, said once in a warning.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, ContextManager, Iterator, Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from autobatch.batchnorm.fingerprint import Fingerprint
from autobatch.batchnorm.full_batch import FullBatchStatistics
from autobatch.batchnorm.intercept import BatchNormCall, intercept_batch_norm
from autobatch.batchnorm.recompute import quiet_checkpoint
from autobatch.batchnorm.statistics import name_of
from autobatch.batchnorm.segments import SegmentedGraph, StepGraph, Unsupported
from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.batchnorm.two_pass import TwoPassStrategy
from autobatch.distributed import Ranks
from autobatch.forward import forward_replaced
from autobatch.microstep import MicroStep
from autobatch.plan import Plan
from autobatch.stages import Stage, entered
from autobatch.transaction import BatchNormState, RandomState

__all__ = ["PreciseTwoPassStrategy"]

log = logging.getLogger(__name__)


class PreciseTwoPassStrategy(TwoPassStrategy):
    """bn=TwoPass(precise=True): phase 1 through the traced graph, the exact backward segment by segment."""

    def __init__(self, layers: list[_BatchNorm], names: dict[int, str], ranks: Ranks, micro: MicroStep,
                 phase1_memory_format: Optional[torch.memory_format] = None):
        if micro.ddp is not None or micro.fsdp is not None or ranks.active:
            raise ValueError("TwoPass(precise=True) runs in one process for now: its segment backward does not yet "
                             "reduce the BatchNorm sums over ranks; use bn='two_pass' or bn='exact' with several")
        super().__init__(layers, names, ranks, micro, phase1_memory_format, stop_early=False)
        self._graph: Optional[SegmentedGraph] = None
        #: The model as the graph (or the reason it has none) saw it.
        self._captured: Optional[Fingerprint] = None
        #: Why the model runs as plain two_pass (None: not known to be unsupported).
        self._unsupported: Optional[str] = None
        #: The running step's graph; None while the step runs as plain two_pass.
        self._run: Optional[StepGraph] = None
        self._kept_bytes = 0

    def gradient_of(self, plan: Plan) -> str:
        words = super().gradient_of(plan)
        if words != self.gradient:
            return words
        if plan.phase1_chunks > 1 or self._traced() is None:
            reason = self._unsupported or f"phase 1 runs in {plan.phase1_chunks} chunks"
            return f"{TwoPassStrategy.gradient} (precise cannot run: {reason})"
        return "precise: the full batch's exact gradient"

    # -- the planner's questions ----------------------------------------------------------------

    def trial_phase1(self, batch: Any, chunks: int) -> None:
        if chunks > 1 or self._traced() is None:
            return super().trial_phase1(batch, chunks)
        self.draws.clear()
        try:  # the trial's transaction puts the BatchNorm buffers back (autobatch.planning.trials)
            run = self._graph_pass(batch, FullBatchStatistics(self.names, stop_early=False))
        except Unsupported as error:
            self._unsupported = str(error)
            return super().trial_phase1(batch, chunks)
        self._kept_bytes = run.kept_bytes

    def take_draw_bytes(self) -> int:
        """Phase 1's random draws and, in a precise step, the boundary tensors it keeps for the backward."""
        size, self._kept_bytes = super().take_draw_bytes() + self._kept_bytes, 0
        return size

    # -- one logical batch -----------------------------------------------------------------------

    def prepare(self, batch: Any, splits: list[int], chunks: int, total: int) -> Any:
        self._run = None
        if chunks > 1:
            self._warn_unsupported(f"phase 1 runs in {chunks} chunks to fit the memory budget")
        elif self._traced() is not None:
            BatchNormStrategy.prepare(self, batch, splits, chunks, total)
            batch = self.micro.batches.to(batch, self.micro.device)
            self._splits, self._total = splits, total
            restore = (BatchNormState(self.layers), RandomState())
            try:
                self._run = self._phase1_through_graph(batch)
            except Unsupported as error:
                for part in restore:
                    part.restore()
                self._unsupported = str(error)
            else:
                return batch
        self._warn_unsupported(self._unsupported)
        return super().prepare(batch, splits, chunks, total)

    def micro_batch(self, index: int, first_row: int, size: int) -> ContextManager[None]:
        if self._run is None:
            return super().micro_batch(index, first_row, size)
        run = self._run

        def output_rows(*args: Any, **kwargs: Any) -> Any:
            return run.output_rows(first_row, size)

        return forward_replaced(self.micro.module, output_rows)

    def backward(self, first_row: int, size: int) -> ContextManager[None]:
        if self._run is None:
            return super().backward(first_row, size)
        return self._backward(self._run, first_row, size)

    @contextlib.contextmanager
    def _backward(self, run: StepGraph, first_row: int, size: int) -> Iterator[None]:
        yield
        run.take_output_grads(first_row, size)
        if first_row + size == run.rows:
            with entered(Stage.MICRO_BATCHES), self.micro.autocast(), quiet_checkpoint():
                run.backward(self._splits, self.handler.layers, self._intercept, self._replay)
            self._run = None

    def _intercept(self, handler: Callable[[BatchNormCall], Tensor]) -> ContextManager[None]:
        return intercept_batch_norm(handler)

    def _replay(self, first_row: int, rows: int, draw: int) -> ContextManager[None]:
        if not self.draws.recorded:
            return contextlib.nullcontext()
        return self.draws.replay(first_row, rows, start=draw)

    # -- phase 1 through the graph ----------------------------------------------------------------

    def _traced(self) -> Optional[SegmentedGraph]:
        """The model's graph, traced again whenever the model changed since (never a stale graph); None where
        it cannot be (the reason kept for the warning)."""
        if self._captured is not None:
            change = self._captured.changed(Fingerprint.of(self.micro.module))
            if change is not None:
                log.info("autobatch: the model changed since its graph was captured (%s); capturing it again", change)
                self._graph, self._unsupported, self._captured = None, None, None
        if self._graph is None and self._unsupported is None:
            try:
                with quiet_checkpoint():  # tracing calls a reentrant checkpoint with inputs that need no grad
                    self._graph = SegmentedGraph.trace(self.micro.module)
            except Unsupported as error:
                self._unsupported = str(error)
            self._captured = Fingerprint.of(self.micro.module)
        return self._graph if self._unsupported is None else None

    def _phase1_through_graph(self, batch: Any) -> StepGraph:
        self.draws.clear()
        with torch.no_grad(), self.micro.autocast(), quiet_checkpoint():
            self._measure_layout(batch, self.handler.ranks)
        return self._graph_pass(self.layout.convert(batch), self.handler)

    def _graph_pass(self, batch: Any, handler: FullBatchStatistics) -> StepGraph:
        """Phase 1 of ``batch`` through the graph under ``handler``; the graph's run, boundaries kept."""
        rows = self.micro.batches.size(batch)
        cuts = [layer for layer in self.layers if layer.training or layer.running_mean is None]
        seen: list[Tensor] = []
        runs: list[StepGraph] = []

        def record(call: BatchNormCall) -> Tensor:
            if call.input.shape[0] != rows:
                # The segments cut a boundary tensor by its first dimension: it must be the samples'.
                name = name_of(call, self.names, len(seen))
                raise Unsupported(f"BatchNorm layer {name!r} normalizes a tensor whose first dimension "
                                  f"({call.input.shape[0]}) is not the batch's samples ({rows})")
            seen.append(call.input)
            return handler.record(call)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if runs:
                raise Unsupported("the loss calls the model more than once")
            runs.append(self._graph.start(args, kwargs, rows, cuts))
            return runs[0].forward(seen, lambda: self.draws.recorded)

        handler.start_phase1()
        with entered(Stage.PHASE1), torch.no_grad(), self.micro.autocast(), quiet_checkpoint(), \
                intercept_batch_norm(record), self.draws.record(0, rows), \
                forward_replaced(self.micro.module, forward):
            self.micro.forward(batch)
        if not runs:
            raise Unsupported("the loss does not call the model itself")
        handler.finish_phase1(True)
        if len(handler.layers) != len(seen):
            raise Unsupported("BatchNorm layers ran outside the model's forward")
        return runs[0]

    def _warn_unsupported(self, reason: Optional[str]) -> None:
        if reason is None or not self.micro.once.first("precise unsupported"):
            return
        log.warning("two_pass's exact backward (precise=True) does not run here: %s. It trains with the projected "
                    "backward, whose gradient is only close to the full batch's", reason)

