"""A plan's life after the start: smaller after running out of memory, back to the model's size later.

    recovery = Recovery(share=16, split_mode=Mode.TWO_PASS, whole_batch_only=False, grow_after=50)
    plan = recovery.after_out_of_memory(plan, Phase.MICRO_BATCHES, "CUDA out of memory")
    plan = recovery.capped(plan)                      # every later batch of that sample size: no larger
    recovery.after_clean_step()                       # after 50 clean steps: True, the ceilings lifted
"""
from __future__ import annotations

import logging
from typing import Optional

from autobatch.checkpointing import Checkpointing
from autobatch.modes import Mode
from autobatch.phases import Phase
from autobatch.plan import Phase1, Plan
from autobatch.planning.search import shrink

__all__ = ["Recovery"]

log = logging.getLogger(__name__)


class Recovery:
    """How running out of memory changes the plans of a sample size. ``split_mode``: the mode that runs in
    micro-batches; ``whole_batch_only``: bn="exact", which has nothing smaller to run."""

    def __init__(self, share: int, split_mode: Mode, whole_batch_only: bool, grow_after: Optional[int] = None):
        self.share = share
        self.split_mode = split_mode
        self.whole_batch_only = whole_batch_only
        self.grow_after = grow_after
        self.clean_steps = 0
        #: Whether phase 1 alongside the first micro-batch fits; cleared when it ran out of memory there.
        self.lockstep_fits = True
        #: Per sample size, the micro-batch and the phase-1 chunks that ran out of memory's aftermath allows.
        self.ceilings: dict[int, tuple[int, str]] = {}
        self.chunks: dict[int, int] = {}

    def fitted(self, plan: Plan) -> None:
        self.clean_steps = 0

    def capped(self, plan: Plan) -> Plan:
        """``plan`` within what running out of memory left for its sample size."""
        s = plan.sample_size
        if s in self.ceilings and plan.micro_batch > self.ceilings[s][0]:
            plan = plan.replace(micro_batch=self.ceilings[s][0], reason=self.ceilings[s][1])
        if s in self.chunks and not plan.phase1.lockstep and plan.phase1.chunks < self.chunks[s]:
            plan = plan.replace(phase1=Phase1.chunked(self.chunks[s]))
        if not self.lockstep_fits and plan.phase1.lockstep:
            plan = plan.replace(phase1=Phase1.whole())
        return plan

    def after_out_of_memory(self, plan: Plan, phase: Phase, message: str) -> Plan:
        """For the same batch: phase 1 before the micro-batches if it failed alongside the first one,
        more phase-1 chunks if it failed in phase 1, else a smaller micro-batch."""
        self.clean_steps = 0
        if plan.bn is Mode.EXACT:
            plan = self._split_after_whole_batch(plan, message)
            self.ceilings[plan.sample_size] = (plan.micro_batch, plan.reason)
        elif phase is Phase.LOCKSTEP:
            self.lockstep_fits = False
            plan = plan.replace(phase1=Phase1.whole(), reason="out of memory with phase 1 alongside the first "
                                                              "micro-batch: phase 1 now runs before the micro-batches")
        elif phase is Phase.STATISTICS_PASS:
            chunks = min(self.share, plan.phase1.chunks * 2)
            if chunks == plan.phase1.chunks:
                raise MemoryError(f"out of memory in phase 1 one sample at a time ({message})")
            self.chunks[plan.sample_size] = chunks
            plan = plan.replace(phase1=Phase1.chunked(chunks), reason=f"out of memory in phase 1: now {chunks} chunks")
        else:
            smaller = shrink(plan.micro_batch)
            plan = plan.replace(micro_batch=smaller,
                                reason=f"out of memory at micro_batch={plan.micro_batch}: shrunk to {smaller}")
            self.ceilings[plan.sample_size] = (smaller, plan.reason)
        # Not stored: the cache keeps the fitted plan, and a transient shortage must not shrink the next launch.
        log.warning("autobatch ran out of memory (%s); %s; redoing the same logical batch", message, plan.reason)
        return plan

    def _split_after_whole_batch(self, plan: Plan, message: str) -> Plan:
        """bn="auto" goes on in micro-batches; bn="exact" has nothing smaller to run."""
        if self.whole_batch_only:
            raise MemoryError(f"bn='exact' ran out of memory with the whole batch of {self.share} ({message}) "
                              f"under checkpointing {plan.checkpointing.label}; plan again with a smaller "
                              "memory_budget (and cache='refresh'), or use bn='two_pass'")
        smaller = shrink(plan.micro_batch)
        return plan.replace(bn=self.split_mode, micro_batch=smaller, checkpointing=Checkpointing(),
                            reason=f"out of memory with the whole batch in one piece: {self.split_mode} "
                                   f"in micro-batches of {smaller}")

    def after_clean_step(self) -> bool:
        """Whether ``grow_after`` clean steps since running out of memory have passed: the ceilings are
        lifted, and the memory model's sizes apply again."""
        if self.grow_after is None or not self.ceilings:
            return False
        self.clean_steps += 1
        if self.clean_steps < self.grow_after:
            return False
        self.clean_steps = 0
        self.ceilings.clear()
        return True
