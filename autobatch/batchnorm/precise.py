"""bn=TwoPass(precise=True): two_pass with the full batch's exact backward, segment by segment.

Phase 1 runs the whole batch through the model's captured graph (autobatch.batchnorm.capture), records
every BatchNorm's statistics as two_pass does, and keeps the tensors at the cuts
(autobatch.batchnorm.segment_run). Each micro-batch's loss is taken on its rows of phase 1's output,
which is the full batch's; the last micro-batch's backward then goes down the graph one segment at a
time::

    precise = PreciseTwoPassStrategy(TwoPassStrategy(layers, names, ranks, micro, stop_early=False))
    norm = precise.for_step(splits, chunks)           # itself, or the projected two_pass where it cannot run
    batch, norm = norm.prepare(batch, splits, 1, total)     # phase 1, boundaries kept (or handed on)
    ...                                          # then as every strategy (autobatch.batchnorm.strategy)

Where the graph cannot be had (torch.fx cannot trace the model, the loss calls it twice, phase 1
runs in chunks), the step is handed to the plain two_pass strategy, said once in a warning; the
ranks of a DistributedDataParallel model agree on it (one all-gather before phase 1 and one after). Under
DDP each BatchNorm's two backward sums are summed over the ranks, once per layer, as SyncBatchNorm's
backward sums them, and the gradients DDP's reducer did not see are averaged over the ranks as it would
(`autobatch.distributed.average_gradients`). Not under fully_shard (FSDP2) yet (`cannot_run_with`).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, ContextManager, Iterator, Optional

import torch
from torch import Tensor

from autobatch.batchnorm.capture import CapturedGraph, Unsupported
from autobatch.batchnorm.fingerprint import Fingerprint
from autobatch.batchnorm.full_batch import FullBatchStatistics
from autobatch.batchnorm.intercept import BatchNormCall, intercept_batch_norm
from autobatch.batchnorm.recompute import quiet_checkpoint
from autobatch.batchnorm.rows import rows_per_sample
from autobatch.batchnorm.segment_run import SegmentRun
from autobatch.batchnorm.statistics import LayerStatistics, name_of
from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.batchnorm.two_pass import TwoPassStrategy
from autobatch.distributed import average_gradients
from autobatch.forward import forward_replaced
from autobatch.microstep import MicroStep
from autobatch.modes import Boundaries, TwoPass
from autobatch.plan import Plan
from autobatch.stages import Stage, entered
from autobatch.transaction import BatchNormState, RandomState, put_back

__all__ = ["PreciseTwoPassStrategy", "cannot_run_with"]

log = logging.getLogger(__name__)


class _Called(Exception):
    """The model was called: its arguments are what `PreciseTwoPassStrategy._call_of` wanted."""


def cannot_run_with(micro: MicroStep) -> Optional[str]:
    """Why precise cannot run with ``micro``'s processes (None: it can): one, or DistributedDataParallel's; not yet
    a fully_shard (FSDP2) model, whose parameters the segment backward would need unsharded around each segment.
    The one place that rule is written."""
    if micro.fsdp is not None:
        return ("TwoPass(precise=True) does not run under fully_shard (FSDP2) yet: its segment backward runs the "
                "module's captured graph, whose parameters FSDP2 keeps sharded outside the module's own forward")
    return None


class PreciseTwoPassStrategy(BatchNormStrategy):
    """bn=TwoPass(precise=True): phase 1 through the traced graph, the exact backward segment by segment.

    Built around ``projected``, the plain two_pass strategy: precise shares its phase-1 statistics, random
    draws, memory format and checks, and hands each step on to it where precise cannot run (`for_step`:
    known before phase 1; `prepare`: found by phase 1 through the graph)."""

    name = TwoPass.name
    gradient = "precise: the full batch's exact gradient"
    has_segment_backward = True

    def __init__(self, projected: TwoPassStrategy):
        why_not = cannot_run_with(projected.micro)
        if why_not is not None:
            raise ValueError(f"{why_not}; use bn='two_pass' or bn='exact' there")
        super().__init__(projected.layers, projected.names, projected.ranks)
        self.projected = projected
        self.micro = projected.micro
        self._graph: Optional[CapturedGraph] = None
        #: The model as the graph (or the reason it has none) saw it.
        self._captured: Optional[Fingerprint] = None
        #: Why the model runs as plain two_pass (None: not known to be unsupported).
        self._unsupported: Optional[str] = None
        #: Why torch.fx could not trace the model symbolically (None: it could, or has not tried): the graph is then
        #: traced on real inputs.
        self._symbolic_failure: Optional[str] = None
        #: The running step's graph.
        self._run: Optional[SegmentRun] = None
        self._kept_bytes = 0
        #: What keeping every boundary would add to the last phase 1's (`every_boundary_bytes`).
        self._every_boundary_bytes = 0
        #: What recomputing whole segments would add to that (`whole_segment_bytes`).
        self._whole_segment_bytes = 0
        #: What phase 1 keeps for the segment backward, as the plan chose.
        self._boundaries = Boundaries.GROUPED
        #: Why the plan runs the projected backward (its segment backward did not fit the memory); None: it may.
        self._not_planned: Optional[str] = None
        #: The splits of the step whose `for_step` checked the graph against the model: that step's `prepare` takes
        #: the graph without taking the model's fingerprint again (once, then cleared).
        self._checked_splits: Optional[list[int]] = None

    # What precise shares with the projected two_pass: phase 1's statistics, its random draws, its memory format.
    handler = property(lambda self: self.projected.handler)
    draws = property(lambda self: self.projected.draws)
    layout = property(lambda self: self.projected.layout)

    def gradient_of(self, plan: Plan) -> str:
        words = self.projected.gradient_of(plan)
        if words != self.projected.gradient:
            return words  # one piece, or no batch statistics: exact either way
        reason = self._cannot_run(plan.phase1_chunks, plan.not_precise)
        if reason is not None:
            return f"{words} (precise cannot run: {reason})"
        if self._graph is None:  # torch.fx could not trace it symbolically; the first step traces it on real inputs
            return f"{self.gradient}, once the first step has traced the model on its inputs"
        return self.gradient

    def adopt(self, plan: Plan) -> None:
        self._not_planned = plan.not_precise
        self._boundaries = plan.boundaries

    def _cannot_run(self, chunks: int, planned: Optional[str] = None) -> Optional[str]:
        """Why a step with phase 1 in ``chunks`` cannot run precise, as far as is known before its phase 1;
        ``planned``: why the plan does not run it, if it does not."""
        if planned is not None:
            return planned
        if chunks > 1:
            return f"phase 1 runs in {chunks} chunks to fit the memory budget"
        self._traced()
        return self._unsupported  # None also where the graph is still to be traced on real inputs

    def for_step(self, splits: list[int], chunks: int = 1) -> BatchNormStrategy:
        norm = self.projected.for_step(splits, chunks)
        if norm is not self.projected:
            return norm  # plain
        # Every rank runs precise or none does: its segment backward meets the others' in a collective per layer.
        reason = self.ranks.first_reason(self._cannot_run(chunks, self._not_planned))
        if reason is not None:
            self._warn_unsupported(reason)
            return self.projected
        self._checked_splits = splits  # _cannot_run checked the graph against the model just now
        return self

    # -- the planner's questions ----------------------------------------------------------------

    def needs_phase1(self) -> bool:
        return self.projected.needs_phase1()

    def trial_phase1(self, batch: Any, chunks: int) -> None:
        if self._cannot_run(chunks) is None:
            self.draws.clear()
            try:  # the trial's transaction puts the BatchNorm buffers back (autobatch.planning.trials)
                run = self._graph_pass(batch, FullBatchStatistics(self.names, stop_early=False),
                                       Boundaries.GROUPED)
                self._kept_bytes = run.kept_bytes
                return
            except Unsupported as error:
                self._unsupported = str(error)
        self.projected.trial_phase1(batch, chunks)

    def take_draw_bytes(self) -> int:
        """Phase 1's random draws and, in a precise step, the boundary tensors it keeps for the backward."""
        size, self._kept_bytes = self.projected.take_draw_bytes() + self._kept_bytes, 0
        return size

    def every_boundary_bytes(self) -> int:
        return self._every_boundary_bytes

    def whole_segment_bytes(self) -> int:
        return self._whole_segment_bytes

    # -- one logical batch -----------------------------------------------------------------------

    def prepare(self, batch: Any, splits: list[int], chunks: int, total: int) -> tuple[Any, BatchNormStrategy]:
        """Phase 1 through the graph, boundaries kept; where it finds the model cannot run precise, everything
        it changed is put back and the projected two_pass takes the step."""
        batch = self.projected.begin(batch, splits, total)
        restore = (BatchNormState(self.layers), RandomState())
        graph, reason = None, None
        checked, self._checked_splits = splits is self._checked_splits, None
        try:
            graph = self._capture(batch, checked)  # on real inputs, the rank's own: before any collective of phase 1
        except Unsupported as error:
            reason = str(error)
        reason = self.ranks.first_reason(reason)
        if reason is None:
            try:
                self._run = self._phase1_through_graph(batch, graph)
            except Unsupported as error:
                reason = str(error)
            reason = self.ranks.first_reason(reason)
        if reason is not None:
            self._run = None
            put_back([part.restore for part in restore])
            self._unsupported = reason
            self._warn_unsupported(self._unsupported)
            return self.projected.prepare(batch, splits, chunks, total)
        return batch, self

    def intercept(self) -> ContextManager[None]:
        return self.projected.intercept()

    def micro_batch(self, index: int, first_row: int, size: int) -> ContextManager[None]:
        run = self._run

        def output_rows(*args: Any, **kwargs: Any) -> Any:
            # A rank's padding micro-batch (size 0, weighted 0) takes its first sample, whose gradient is dropped.
            return run.output_rows(first_row, size) if size else run.output_rows(0, 1)

        # The micro-batch's loss is taken on its rows of phase 1's output (the full batch's forward).
        return forward_replaced(self.micro.module, output_rows)

    @contextlib.contextmanager
    def backward(self, first_row: int, size: int) -> Iterator[None]:
        yield
        if size:
            self._run.take_output_grads(first_row, size)

    def after_micro_batches(self) -> None:
        """The whole graph's backward, segment by segment, from every micro-batch's output gradient."""
        run, self._run = self._run, None
        total = self.ranks.sum if self.ranks.active else None
        with entered(Stage.SEGMENT_BACKWARD), self.micro.autocast(), quiet_checkpoint():
            failure = run.backward(self.projected.splits, self.handler.layers, intercept_batch_norm, self._replay,
                                   total)
        failure = self.ranks.first_reason(failure)  # every rank refuses the step, or none does
        if failure is not None:
            raise RuntimeError(failure)
        if self.micro.ddp is not None:
            average_gradients(self.micro.ddp)

    def check(self) -> Optional[BaseException]:
        return self.projected.check()

    def non_finite_culprit(self) -> Optional[str]:
        return self.projected.non_finite_culprit()

    def finish(self) -> list[LayerStatistics]:
        return self.projected.finish()

    def _replay(self, first_row: int, rows: int, draw: int) -> ContextManager[None]:
        if not self.draws.recorded:
            return contextlib.nullcontext()
        return self.draws.replay(first_row, rows, start=draw)

    # -- phase 1 through the graph ----------------------------------------------------------------

    def _traced(self, checked: bool = False) -> Optional[CapturedGraph]:
        """The model's graph, captured again whenever the model changed since (never a stale graph): traced
        symbolically where torch.fx can; else None, and the graph is traced on a batch's first samples when
        one comes (`_capture`). The reason precise cannot run is kept for the warning. ``checked``: this step's
        `for_step` compared the model with the graph's fingerprint already (a model has hundreds of modules)."""
        if self._captured is not None and not checked:
            change = self._captured.changed(Fingerprint.of(self.micro.module))
            if change is not None:
                log.info("autobatch: the model changed since its graph was captured (%s); capturing it again", change)
                self._graph, self._unsupported, self._symbolic_failure, self._captured = None, None, None, None
        if self._captured is None:
            try:
                # Tracing calls a reentrant checkpoint with inputs that need no grad; under the step's autocast, so
                # that a forward which changes it is seen.
                with quiet_checkpoint(), self.micro.autocast():
                    self._graph = CapturedGraph.trace(self.micro.module)
            except Unsupported as error:
                self._symbolic_failure = str(error)
            self._captured = Fingerprint.of(self.micro.module)
        return self._graph if self._unsupported is None else None

    def _capture(self, batch: Any, checked: bool = False) -> CapturedGraph:
        """The graph for ``batch``: the symbolic one, else the one traced on real inputs, traced (again) on
        ``batch``'s first samples where its per-sample shapes are not those it was traced at. `Unsupported`
        (kept as the reason) where neither can be had. ``checked``: as `_traced`'s."""
        graph = self._traced(checked)
        if self._unsupported is not None:
            raise Unsupported(self._unsupported)
        if self._symbolic_failure is None:
            return graph
        args, kwargs = self._call_of(batch)
        if graph is None or not graph.matches(args, kwargs):
            saved = (BatchNormState(self.layers), RandomState())  # the traces run the BatchNorms in training mode
            try:
                with self.micro.autocast(), quiet_checkpoint():
                    self._graph = CapturedGraph.trace_with(self.micro.module, args, kwargs)
            except Unsupported as error:
                self._graph = None
                self._unsupported = f"{self._symbolic_failure}, nor on real inputs: {error}"
                raise Unsupported(self._unsupported) from error
            finally:
                put_back([part.restore for part in saved])
        return self._graph

    def _call_of(self, batch: Any) -> tuple[tuple, dict]:
        """The arguments the loss calls the model with, for the first 3 samples of ``batch`` (the model itself
        not run)."""
        calls: list[tuple[tuple, dict]] = []

        def called(*args: Any, **kwargs: Any) -> Any:
            calls.append((args, kwargs))
            raise _Called

        rows = min(3, self.micro.batches.size(batch))
        with torch.no_grad(), forward_replaced(self.micro.module, called):
            try:
                self.micro.forward(self.micro.batches.take(batch, rows))
            except _Called:
                pass
        if not calls:
            raise Unsupported("the loss does not call the model itself")
        return calls[0]

    def _phase1_through_graph(self, batch: Any, graph: CapturedGraph) -> SegmentRun:
        self.projected.measure_layout(batch, self.handler.ranks)
        return self._graph_pass(self.layout.convert(batch), self.handler, self._boundaries, graph)

    def _graph_pass(self, batch: Any, handler: FullBatchStatistics, boundaries: Boundaries,
                    graph: Optional[CapturedGraph] = None) -> SegmentRun:
        """Phase 1 of ``batch`` through ``graph`` (default: captured for it) under ``handler``; the graph's run,
        keeping ``boundaries``."""
        graph = graph or self._capture(batch)
        rows = self.micro.batches.size(batch)
        cut_layers = [layer for layer in self.layers if layer.training or layer.running_mean is None]
        seen: list[Tensor] = []
        runs: list[SegmentRun] = []
        refused: list[str] = []

        def record(call: BatchNormCall) -> Tensor:
            if rows_per_sample(call.input.shape[0], rows) is None and not refused:
                # The segments cut a boundary tensor by its first dimension: it must hold the samples, k rows each.
                name = name_of(call, self.names, len(seen))
                refused.append(f"BatchNorm layer {name!r} normalizes a tensor whose first dimension "
                               f"({call.input.shape[0]}) is not the batch's samples ({rows}) nor a multiple of them")
                if not handler.ranks.active:  # else phase 1 goes on, meeting the other ranks' statistics
                    raise Unsupported(refused[0])
            seen.append(call.input)
            return handler.record(call)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if runs:
                raise Unsupported("the loss calls the model more than once")
            runs.append(SegmentRun.start(graph, args, kwargs, rows, cut_layers, boundaries))
            return runs[0].forward(seen, lambda: self.draws.recorded)

        handler.start_phase1(rows)
        with entered(Stage.PHASE1), torch.no_grad(), self.micro.autocast(), quiet_checkpoint(), \
                intercept_batch_norm(record), self.draws.record(0, rows), \
                forward_replaced(self.micro.module, forward):
            self.micro.forward(batch)
        if refused or not runs:
            raise Unsupported(refused[0] if refused else "the loss does not call the model itself")
        handler.finish_phase1(True)
        if len(handler.layers) != len(seen):
            raise Unsupported("BatchNorm layers ran outside the model's forward")
        self._every_boundary_bytes = runs[0].every_boundary_bytes
        self._whole_segment_bytes = runs[0].whole_segment_bytes
        return runs[0]

    def _warn_unsupported(self, reason: Optional[str]) -> None:
        if reason is None or not self.micro.once.first("precise unsupported"):
            return
        log.warning("two_pass's exact backward (precise=True) does not run here: %s. It trains with the projected "
                    "backward, whose gradient is only close to the full batch's", reason)

