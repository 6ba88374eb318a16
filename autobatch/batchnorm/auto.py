"""bn="auto": the planner chooses per launch between the whole batch in one piece (bn="exact", with
activation checkpointing where needed) and two_pass's micro-batches.

    auto = Auto(exact, two_pass)
    auto.adopt(plan)                 # plan.bn is "exact" or "two_pass": the strategy that runs
    norm = auto.for_step(splits)     # that strategy, as every step asks for it
"""
from __future__ import annotations

from typing import Any

from autobatch.batchnorm.exact import Exact
from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.batchnorm.two_pass import TwoPass
from autobatch.planning.planner import Plan

__all__ = ["Auto"]


class Auto(BatchNormStrategy):
    """Runs ``exact`` or ``two_pass``, whichever the plan chose (two_pass's until a plan exists)."""

    name = "auto"
    prefers_whole_batch = True

    def __init__(self, exact: Exact, two_pass: TwoPass):
        super().__init__(two_pass.layers, two_pass.names, two_pass.ranks)
        self._modes: dict[str, BatchNormStrategy] = {Exact.name: exact, TwoPass.name: two_pass}
        self.two_pass = two_pass
        self.chosen: BatchNormStrategy = two_pass

    @property
    def split_mode(self) -> str:
        return self.two_pass.name

    def adopt(self, plan: Plan) -> None:
        self.chosen = self._modes[plan.bn]
        self.chosen.adopt(plan)

    def for_step(self, splits: list[int]) -> BatchNormStrategy:
        return self.chosen.for_step(splits)

    def needs_statistics_pass(self) -> bool:
        return self.two_pass.needs_statistics_pass()

    def trial_statistics_pass(self, batch: Any, chunks: int) -> None:
        self.two_pass.trial_statistics_pass(batch, chunks)

    def take_draw_bytes(self) -> int:
        return self.two_pass.take_draw_bytes()
