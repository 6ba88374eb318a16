"""Where the ranks agree: on each batch and the settings, on the plan at the start, on what a step runs.

    sizes, shape = agree_on_batch(ranks, error, size, settings, StepShape.of(plan, size))
    plan = agree_on_plan(ranks, plan)         # the start: the smallest capacity, the most phase-1 chunks

One all-gather each, in the same order on every rank, so that a rank that fails makes every rank
raise instead of leaving the others waiting in a collective.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

from autobatch.distributed import RankFailure, Ranks
from autobatch.plan import Plan

__all__ = ["Planned", "StepShape", "agree_on_batch", "agree_on_plan"]


class StepShape(NamedTuple):
    """What every rank runs of one logical batch: as many micro-batches and phase-1 chunks as the rank
    that needs most (a rank with fewer samples repeats one at weight 0)."""

    count: int
    phase1_chunks: int

    @classmethod
    def of(cls, plan: Plan, size: int) -> "StepShape":
        """This rank's shape for a batch of ``size`` samples under ``plan``."""
        return cls(max(1, math.ceil(size / plan.capacity)), plan.phase1_chunks)


class Planned(NamedTuple):
    """One logical batch's plan as every rank runs it."""

    plan: Plan
    #: Micro-batches on every rank (a rank with fewer samples repeats one at weight 0).
    count: int
    #: Whether to measure the step: a sample size the memory model has not measured (on CUDA: every step).
    measure: bool

    @classmethod
    def agreed(cls, plan: Plan, measure: bool, shape: StepShape) -> "Planned":
        """``plan`` with phase 1 in as many chunks as the rank that needs most."""
        if shape.phase1_chunks != plan.phase1_chunks:
            plan = plan.replace(phase1_chunks=shape.phase1_chunks)
        return cls(plan, shape.count, measure)


def agree_on_batch(ranks: Ranks, error: Optional[BaseException], size: int, settings: dict[str, float],
                   shape: Optional[StepShape]) -> tuple[list[int], Optional[StepShape]]:
    """Every rank's samples and the step's shape (None before a plan exists), from one all-gather of this
    rank's ``error`` (its batch rejected), ``size``, ``settings`` (what every rank must share) and ``shape``.
    Raises on every rank where any rank rejected its batch or the settings differ."""
    if not ranks.active:
        if error is not None:
            raise error
        return [size], shape
    table = ranks.gather([error is not None, size] + list(settings.values()) + list(shape or (0, 0)))
    failed = [rank for rank in range(ranks.world_size) if table[rank, 0]]
    if failed:
        messages = ranks.gather_messages("" if error is None else str(error))
        if error is not None:
            raise error
        raise RankFailure(f"rank {failed[0]} rejected its batch: {messages[failed[0]]}")
    for column, name in enumerate(settings, start=2):
        values = table[:, column].tolist()
        if len(set(values)) > 1:
            raise RankFailure(f"the ranks disagree on {name} ({values}); every rank must wrap the same model with the "
                              "same settings")
    sizes = [int(n) for n in table[:, 1].tolist()]
    if shape is None:
        return sizes, None
    return sizes, StepShape(int(table[:, -2].max()), int(table[:, -1].max()))


def agree_on_plan(ranks: Ranks, plan: Plan) -> Plan:
    """The start's plan every rank runs: the smallest capacity and the most phase-1 chunks of any rank."""
    if not ranks.active:
        return plan
    table = ranks.gather([plan.capacity, plan.phase1_chunks])
    capacity, chunks = int(table[:, 0].min()), int(table[:, 1].max())
    if (capacity, chunks) == (plan.capacity, plan.phase1_chunks):
        return plan
    return plan.replace(capacity=capacity, phase1_chunks=chunks, reason=plan.reason + "; agreed with the other ranks")
