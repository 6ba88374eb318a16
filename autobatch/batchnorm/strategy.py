"""What a BatchNorm mode does in a step: the interface every mode implements, and the plain mode.

The step drives one strategy object per logical batch, the same way for every mode::

    norm = strategy.for_step(splits, chunks)         # plain where one micro-batch holds the batch
    batch, norm = norm.prepare(batch, splits, chunks, total)     # two_pass: phase 1 (precise may hand on)
    with norm.intercept():
        for index, (first_row, size) in enumerate(rows):
            with norm.micro_batch(index, first_row, size):
                loss = loss_fn(model(part), targets)
            error = norm.check()                     # before the last backward
            with norm.backward(first_row, size):
                loss.backward()
    if norm.has_segment_backward:
        norm.after_micro_batches()                   # precise: the segment backward
    layers = norm.finish()                           # the layers whose running statistics it set
"""
from __future__ import annotations

import contextlib
from typing import Any, ClassVar, ContextManager, Iterator, Optional

from torch.nn.modules.batchnorm import _BatchNorm

from autobatch.batchnorm.intercept import intercept_batch_norm
from autobatch.batchnorm.recompute import recompute_with_own_statistics
from autobatch.batchnorm.statistics import LayerStatistics, uses_batch_statistics
from autobatch.distributed import Ranks
from autobatch.modes import Mode, Pieces
from autobatch.plan import Plan

__all__ = ["BatchNormStrategy", "Plain"]


class BatchNormStrategy:
    """One BatchNorm mode. Its defaults are plain PyTorch: each micro-batch normalizes with its own
    statistics, running statistics move as nn.BatchNorm moves them, counted once per logical batch."""

    #: The ``bn`` option that selects it.
    name: ClassVar[str]
    #: The gradient a step in micro-batches computes, in words (the plan shows it beside ``bn``).
    gradient: ClassVar[str] = "each micro-batch's own statistics: not the full batch's gradient"

    def __init__(self, layers: list[_BatchNorm], names: dict[int, str], ranks: Ranks):
        self.layers = layers
        self.names = names
        self.ranks = ranks

    def for_step(self, splits: list[int], chunks: int = 1) -> "BatchNormStrategy":
        """The strategy for a logical batch in ``splits`` (phase 1 in ``chunks``): this one, or plain where one
        micro-batch holds the whole batch or no layer normalizes with batch statistics."""
        if len(splits) > 1 and uses_batch_statistics(self.layers):
            return self
        return Plain(self.layers, self.names, self.ranks)

    def gradient_of(self, plan: Plan) -> str:
        """The gradient a step under ``plan`` computes, in words."""
        if len(plan.splits) == 1:
            return "exact: the whole batch in one piece"
        if not uses_batch_statistics(self.layers):
            return "exact: no BatchNorm normalizes with batch statistics"
        return self.gradient

    @property
    def split_mode(self) -> Mode:
        """The mode that runs when the planner splits the batch into micro-batches."""
        return Mode(self.name)

    def adopt(self, plan: Plan) -> None:
        """Take on the plan's choices that concern the strategy (bn="exact"'s checkpointing, the mode
        bn="auto" chose); before every step."""

    # -- the planner's questions ----------------------------------------------------------------

    @property
    def pieces(self) -> Pieces:
        """How the planner cuts this mode's logical batches: micro-batches, unless the mode runs the whole
        batch in one piece (autobatch.planning.planner)."""
        return Pieces.MICRO_BATCHES

    def needs_phase1(self) -> bool:
        """Whether a step runs phase 1 (a no-grad forward of the whole batch) before its micro-batches."""
        return False

    def trial_phase1(self, batch: Any, chunks: int) -> None:
        """Phase 1 as a planner's trial runs it, leaving the model and running statistics alone."""
        raise NotImplementedError(f"bn={self.name!r} has no phase 1")

    def take_draw_bytes(self) -> int:
        """Bytes of phase 1's random draws held through the micro-batches, forgotten once read."""
        return 0

    def every_boundary_bytes(self) -> int:
        """Bytes precise's phase 1 would keep beyond its grouped layout's if it kept every boundary, as the last
        phase 1 found them (0: no precise step has run or been tried)."""
        return 0

    def whole_segment_bytes(self) -> int:
        """Bytes precise's segment backward would hold beyond that if it recomputed whole segments rather than
        micro-batch by micro-batch (`Boundaries.WHOLE_SEGMENTS`), as the last phase 1 found them (0: as above)."""
        return 0

    # -- one logical batch -----------------------------------------------------------------------

    def prepare(self, batch: Any, splits: list[int], chunks: int, total: int) -> tuple[Any, "BatchNormStrategy"]:
        """Before the micro-batches (``total``: samples over all ranks); returns the batch to split and the
        strategy that runs the micro-batches: itself, or the one it hands the step on to (precise, where its
        phase 1 finds that it cannot run)."""
        return batch, self

    def intercept(self) -> ContextManager[None]:
        """Around every micro-batch's forward and backward."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def micro_batch(self, index: int, first_row: int, size: int) -> Iterator[None]:
        """Around the forward of micro-batch ``index``: rows ``first_row:first_row + size`` of the
        logical batch (``size`` 0: a padding micro-batch, at weight 0)."""
        yield

    def backward(self, first_row: int, size: int) -> ContextManager[None]:
        """Around the micro-batch's backward, where activation checkpointing calls BatchNorm again."""
        return intercept_batch_norm(recompute_with_own_statistics)

    #: Whether its steps run a segment backward after the micro-batches (`after_micro_batches`), whose memory
    #: does not follow the micro-batch: the planner measures and sizes it apart.
    has_segment_backward: ClassVar[bool] = False

    def after_micro_batches(self) -> None:
        """After every micro-batch's backward: the work that needs all of them (precise's segment backward)."""

    def check(self) -> Optional[BaseException]:
        """The error that refuses this step, found before its last backward; None if it may go on."""
        return None

    def non_finite_culprit(self) -> Optional[str]:
        """Where a non-finite loss came from, in words, when the strategy can tell."""
        return None

    def finish(self) -> list[LayerStatistics]:
        """After the micro-batches: the layers whose running statistics the strategy updated."""
        return []


class Plain(BatchNormStrategy):
    """No BatchNorm work: one micro-batch, layers in eval mode, or a model without BatchNorm."""

    name = "plain"

    def for_step(self, splits: list[int], chunks: int = 1) -> BatchNormStrategy:
        return self
