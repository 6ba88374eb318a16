"""How a BatchNorm mode sizes its steps: the interface of its planning, one object per run.

    sizing = sizing_for(setting)                  # chosen once, from how the mode cuts a batch (Pieces)
    plan = sizing.measure(state, batch)           # the start, with trials
    plan, measure = sizing.for_batch(state, plan, batch, s)
    plan = sizing.after_out_of_memory(state, plan, stage, message)

A sizing keeps only its `Setting` (the step, the mode, the trials): what it measures and decides it
writes to the `PlannerState` it is handed, which the planner (autobatch.planning.planner) owns. The
planner asks the sizing and never which mode runs: micro-batches (autobatch.planning.micro_batches),
the whole batch (autobatch.planning.whole), or auto's choice between them.
"""
from __future__ import annotations

from typing import Any, Optional

from autobatch.plan import Plan
from autobatch.planning.state import PlannerState, Setting
from autobatch.stages import Stage

__all__ = ["Sizing"]


class Sizing:
    """One mode's planning, over the `Setting` of a run."""

    def __init__(self, setting: Setting):
        self.setting = setting

    def measure(self, state: PlannerState, batch: Any) -> Plan:
        """The start's plan, measured with trials on ``batch`` (the model restored afterwards)."""
        raise NotImplementedError

    def from_record(self, state: PlannerState, base: Plan, batch: Any, path: str) -> Optional[Plan]:
        """The plan of a cache record (``base``: its mode and checkpointing, the models loaded) for ``batch``;
        None where this mode does not run the record's plan (``path``: the file, for the warning)."""
        raise NotImplementedError

    def for_size(self, state: PlannerState, plan: Plan, s: int, batch: Any = None) -> Plan:
        """``plan`` for samples of ``s`` elements, as the memory model sizes it."""
        raise NotImplementedError

    def for_batch(self, state: PlannerState, plan: Plan, batch: Any, s: int) -> Optional[tuple[Plan, bool]]:
        """The plan for ``batch`` (``s`` elements per sample), and whether its step should be measured; None
        where the plan cannot hold it and the start's measurement must be made again."""
        raise NotImplementedError

    def learn(self, state: PlannerState, plan: Plan, batch: Any, s: int) -> bool:
        """Trials at ``batch``'s size now, where the model has not measured it; whether it learned anything."""
        return False

    def after_out_of_memory(self, state: PlannerState, plan: Plan, stage: Stage, message: str) -> Plan:
        """A smaller plan for the same batch, after running out of memory in ``stage``."""
        raise NotImplementedError

    def grown(self, state: PlannerState, plan: Plan) -> Plan:
        """The memory model's plan again, once the ceilings that running out of memory set are lifted."""
        return plan
