"""What the planner knows of a run (`PlannerState`) and what its sizings work with (`Setting`).

    state = PlannerState()                   # the planner's own: the plan, the memory models, the ceilings
    saved = state.snapshot()                 # a step's transaction keeps it...
    saved.restore()                          # ...and puts it back when the step fails
    plan = sizing.measure(setting, state, batch)   # every sizing call receives both; none keeps either

The planner (autobatch.planning.planner) owns one state per run; a sizing
(autobatch.planning.sizing) reads and writes what it is handed, so that the planner's knowledge lives
in one object, saved and put back as one.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.distributed import Ranks
from autobatch.microstep import MicroStep
from autobatch.options import Options
from autobatch.plan import Plan
from autobatch.planning.memory import Budget
from autobatch.planning.model import MemoryModel
from autobatch.planning.recovery import Recovery
from autobatch.planning.trials import Trials

__all__ = ["PlannerState", "Setting"]


@dataclass(frozen=True)
class Setting:
    """What a run's planning works with, fixed at ``wrap``: the step, the mode, the options, the trials
    and this rank's share of a logical batch."""

    micro: MicroStep
    strategy: BatchNormStrategy
    options: Options
    trials: Trials

    @property
    def ranks(self) -> Ranks:
        return self.micro.ranks

    @property
    def share(self) -> int:
        """This rank's samples of a full logical batch."""
        return self.micro.share


@dataclass
class PlannerState:
    """Everything the planner has measured and decided in a run, in one place."""

    #: The plan of the last batch (None until the start measures one, or the plan the user fixed).
    plan: Optional[Plan] = None
    #: The memory of a step: of its micro-batches (n samples), or of the whole batch under bn="exact".
    model: Optional[MemoryModel] = None
    #: two_pass's phase 1: n is the samples of one chunk.
    phase1: Optional[MemoryModel] = None
    limit: Optional[Budget] = None
    #: Per sample size, the smallest micro-batch whose trial ran out of memory or passed the budget.
    failed: dict[int, int] = field(default_factory=dict)
    #: Bytes of phase 1's recorded draws per sample element: resident in a real step, not in a trial.
    draws_per_element: float = 0.0
    #: Bytes per sample element that precise keeping every boundary adds to its grouped layout (the last phase 1's).
    every_boundary_per_element: float = 0.0
    #: Bytes per sample element that recomputing whole segments adds beside every boundary (the last phase 1's).
    whole_segment_per_element: float = 0.0

    def learn_boundaries(self, every_boundary_bytes: int, whole_segment_bytes: int, s: int) -> None:
        """What a phase 1 of samples of ``s`` elements found keeping every boundary, and recomputing whole
        segments, would add (bytes): per sample element from now on."""
        self.every_boundary_per_element = every_boundary_bytes / s
        self.whole_segment_per_element = whole_segment_bytes / s
    #: The device measured, in words, and the plan cache's key.
    device: str = ""
    key: str = ""
    #: The ceilings and floors running out of memory left.
    recovery: Recovery = field(default_factory=Recovery)
    #: Whether the batch now running is redone after running out of memory (not a clean step).
    redoing: bool = False

    def snapshot(self) -> "_Snapshot":
        """The state as it is now, to put back where a step fails (autobatch.transaction)."""
        return _Snapshot(self)


class _Snapshot:
    """A deep copy of a `PlannerState`'s fields (plans and memory models are small), put back in place."""

    def __init__(self, state: PlannerState):
        self._state = state
        self._saved: dict[str, Any] = copy.deepcopy(vars(state))

    def restore(self) -> None:
        # One assignment per field from copies nobody else holds: idempotent, so an interrupted restore may
        # simply run again (autobatch.transaction.put_back).
        vars(self._state).update(copy.deepcopy(self._saved))
