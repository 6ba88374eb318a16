"""What running out of memory leaves for a sample size: a ceiling on its micro-batch, a floor on its phase-1
chunks, lifted after ``grow_after`` clean steps.

    recovery = Recovery()
    plan = recovery.cap(smaller_plan)                 # this sample size's capacity no larger from now on
    recovery.floor_chunks(s, 4)                       # nor phase 1 in fewer than 4 chunks
    plan = recovery.capped(plan)                      # every later batch of that size within both
    recovery.after_clean_step(grow_after=50)          # after 50 clean steps: True, both lifted
    boundaries_after(plan, Stage.SEGMENT_BACKWARD, device)   # what precise keeps instead, or None
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from autobatch.modes import Boundaries
from autobatch.plan import Plan
from autobatch.stages import Stage

__all__ = ["Recovery", "boundaries_after", "host_boundaries"]


def host_boundaries(device: torch.device, chunks: int) -> bool:
    """Whether precise may keep its boundaries in host memory: on CUDA, phase 1 in one piece."""
    return device.type == "cuda" and chunks == 1


def boundaries_after(plan: Plan, stage: Stage, device: torch.device) -> Optional[Boundaries]:
    """What precise keeps after running out of memory in ``stage`` under ``plan`` on ``device``: every boundary,
    recomputed micro-batch by micro-batch, after whole segments; the grouped boundaries after every one (what keeping
    every one added goes first); after the grouped ones ran out in the
    segment backward, every one in host memory where it may (`host_boundaries`). None: nothing smaller to keep."""
    if plan.boundaries is Boundaries.WHOLE_SEGMENTS:
        return Boundaries.EVERY
    if plan.boundaries is Boundaries.EVERY:
        return Boundaries.GROUPED
    if plan.boundaries is Boundaries.GROUPED and stage is Stage.SEGMENT_BACKWARD and \
            host_boundaries(device, plan.phase1_chunks):
        return Boundaries.HOST
    return None


@dataclass
class Recovery:
    """The ceilings and floors running out of memory set, per sample size; the mode's sizing decides them
    (autobatch.planning.sizing). Part of the planner's state (autobatch.planning.state)."""

    #: Clean steps since the last time a step ran out of memory.
    clean_steps: int = 0
    #: Per sample size, the largest capacity running out of memory left, and why.
    ceilings: dict[int, tuple[int, str]] = field(default_factory=dict)
    #: Per sample size, the fewest phase-1 chunks running out of memory left.
    chunks: dict[int, int] = field(default_factory=dict)
    #: Per sample size, why the precise backward is not run: its segment backward ran out of memory.
    not_precise: dict[int, str] = field(default_factory=dict)
    #: Sample sizes whose precise steps recompute segments micro-batch by micro-batch: whole segments ran out.
    every: set[int] = field(default_factory=set)
    #: Sample sizes whose precise steps keep the grouped boundaries only: keeping every one ran out of memory.
    grouped: set[int] = field(default_factory=set)
    #: Sample sizes whose precise steps keep their boundaries in host memory: the grouped ones ran out (CUDA).
    host: set[int] = field(default_factory=set)

    def ran_out_of_memory(self) -> None:
        self.clean_steps = 0

    def cap(self, plan: Plan) -> Plan:
        """``plan``'s capacity is its sample size's ceiling from now on; returns it."""
        self.ceilings[plan.sample_size] = (plan.capacity, plan.reason)
        return plan

    def floor_chunks(self, s: int, chunks: int) -> None:
        self.chunks[s] = chunks

    def capped(self, plan: Plan) -> Plan:
        """``plan`` within what running out of memory left for its sample size."""
        s = plan.sample_size
        if s in self.ceilings and plan.capacity > self.ceilings[s][0]:
            plan = plan.replace(capacity=self.ceilings[s][0], reason=self.ceilings[s][1])
        if s in self.chunks and plan.phase1_chunks < self.chunks[s]:
            plan = plan.replace(phase1_chunks=self.chunks[s])
        if s in self.not_precise and plan.not_precise is None:
            plan = plan.replace(not_precise=self.not_precise[s])
        return plan

    def after_clean_step(self, grow_after: Optional[int]) -> bool:
        """Whether ``grow_after`` clean steps since running out of memory have passed: the ceilings are
        lifted, and the memory model's sizes apply again."""
        if grow_after is None or not (self.ceilings or self.not_precise or self.every or self.grouped or self.host):
            return False
        self.clean_steps += 1
        if self.clean_steps < grow_after:
            return False
        self.clean_steps = 0
        self.ceilings.clear()
        self.not_precise.clear()
        self.every.clear()
        self.grouped.clear()
        self.host.clear()
        return True
