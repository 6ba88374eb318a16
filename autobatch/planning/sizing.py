"""How a BatchNorm mode sizes its steps: the interface of its planning, one object per run.

    sizing = strategy.sizing(kinds)            # chosen once by the mode's strategy
    plan = sizing.measure(batch)               # the start, with trials
    plan, measure = sizing.for_batch(plan, batch, s)
    plan = sizing.after_out_of_memory(plan, stage, message)

The planner (autobatch.planning.planner) asks the sizing and never which mode runs: micro-batches
(autobatch.planning.micro_batches), the whole batch (autobatch.planning.whole), or auto's choice.
"""
from __future__ import annotations

from typing import Any, Optional

from autobatch.plan import Plan
from autobatch.stages import Stage

__all__ = ["Sizing"]


class Sizing:
    """One mode's planning. Its ``planner`` (autobatch.planning.planner, which builds it and so is not imported
    here) holds what the modes share: the budget, the memory models, the trials and the recovery."""

    def measure(self, batch: Any) -> Plan:
        """The start's plan, measured with trials on ``batch`` (the model restored afterwards)."""
        raise NotImplementedError

    def from_record(self, base: Plan, batch: Any, path: str) -> Optional[Plan]:
        """The plan of a cache record (``base``: its mode and checkpointing, the models loaded) for ``batch``;
        None where this mode does not run the record's plan (``path``: the file, for the warning)."""
        raise NotImplementedError

    def for_size(self, plan: Plan, s: int, batch: Any = None) -> Plan:
        """``plan`` for samples of ``s`` elements, as the memory model sizes it."""
        raise NotImplementedError

    def for_batch(self, plan: Plan, batch: Any, s: int) -> tuple[Plan, bool]:
        """The plan for ``batch`` (``s`` elements per sample), and whether its step should be measured."""
        raise NotImplementedError

    def learn(self, plan: Plan, batch: Any, s: int) -> bool:
        """Trials at ``batch``'s size now, where the model has not measured it; whether it learned anything."""
        return False

    def after_out_of_memory(self, plan: Plan, stage: Stage, message: str) -> Plan:
        """A smaller plan for the same batch, after running out of memory in ``stage``."""
        raise NotImplementedError

    def grown(self, plan: Plan) -> Plan:
        """The memory model's plan again, once the ceilings that running out of memory set are lifted."""
        return plan
