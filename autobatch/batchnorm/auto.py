"""bn="auto": the planner chooses per launch between the whole batch in one piece (bn="exact", with
activation checkpointing where needed) and two_pass's micro-batches.

    auto = AutoStrategy(exact, two_pass)
    auto.adopt(plan)                 # plan.bn is "exact" or "two_pass": the strategy that runs
    norm = auto.for_step(splits, chunks)     # that strategy, as every step asks for it
"""
from __future__ import annotations

from typing import Any

from autobatch.batchnorm.exact import ExactStrategy
from autobatch.batchnorm.statistics import uses_batch_statistics
from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.modes import Auto, Mode, Pieces
from autobatch.plan import Plan

__all__ = ["AutoStrategy"]


class AutoStrategy(BatchNormStrategy):
    """Runs ``exact`` or ``two_pass``, whichever the plan chose (two_pass's until a plan exists)."""

    name = Auto.name

    def __init__(self, exact: ExactStrategy, two_pass: BatchNormStrategy):
        super().__init__(two_pass.layers, two_pass.names, two_pass.ranks)
        self._modes: dict[Mode, BatchNormStrategy] = {Mode.EXACT: exact, Mode.TWO_PASS: two_pass}
        self.two_pass = two_pass
        self.chosen: BatchNormStrategy = two_pass

    @property
    def split_mode(self) -> Mode:
        return Mode.TWO_PASS

    @property
    def pieces(self) -> Pieces:
        if not uses_batch_statistics(self.layers):
            # No BatchNorm normalizes with batch statistics (none, or frozen): micro-batches already give the
            # whole batch's exact gradient, and the whole batch in one piece would only cost more.
            return Pieces.MICRO_BATCHES
        return Pieces.WHOLE_OR_SPLIT

    def gradient_of(self, plan: Plan) -> str:
        return self._modes[plan.bn].gradient_of(plan)

    def adopt(self, plan: Plan) -> None:
        self.chosen = self._modes[plan.bn]
        self.chosen.adopt(plan)

    def for_step(self, splits: list[int], chunks: int = 1) -> BatchNormStrategy:
        return self.chosen.for_step(splits, chunks)

    @property
    def has_segment_backward(self) -> bool:  # type: ignore[override]
        return self.two_pass.has_segment_backward

    def needs_phase1(self) -> bool:
        return self.two_pass.needs_phase1()

    def trial_phase1(self, batch: Any, chunks: int) -> None:
        self.two_pass.trial_phase1(batch, chunks)

    def take_draw_bytes(self) -> int:
        return self.two_pass.take_draw_bytes()

    def every_boundary_bytes(self) -> int:
        return self.two_pass.every_boundary_bytes()

    def whole_segment_bytes(self) -> int:
        return self.two_pass.whole_segment_bytes()
