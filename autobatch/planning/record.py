"""The plan cache's record: what a launch keeps of its measurements for the next one, with its JSON and its checks.

    record = PlanRecord(capacity=8, points=[(2, 3072, 1 << 20), (4, 3072, 3 << 20)])
    data = record.to_json()                    # a dict for json.dump
    PlanRecord.from_json(data, share=16)       # the record, or ValueError naming the field that is wrong

Every field is checked, its range too, before a plan is built from a record: a cache file is input
from outside the process (another version, another user, a damaged disk).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from autobatch.checkpointing import Checkpointing
from autobatch.modes import Mode
from autobatch.plan import KEYWORDS_ONLY

__all__ = ["FORMAT", "MAX_SIZE", "PlanRecord"]

#: Bumped whenever what a record means changes; older records are ignored as stale.
FORMAT = 5
#: No real measurement comes near this many bytes (an exbibyte); a larger one is not ours, and arithmetic on it
#: would overflow to infinity and NaN.
MAX_SIZE = 2**60

Point = tuple[int, int, int]


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _size(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        0 <= value <= MAX_SIZE


def _points(value: Any, name: str, share: Optional[int]) -> list[Point]:
    """A record's measured points, [samples, elements per sample, peak bytes] each, checked."""
    if not isinstance(value, list) or not all(
            isinstance(p, list) and len(p) == 3 and _positive_int(p[0]) and _positive_int(p[1]) and p[1] <= MAX_SIZE
            and _size(p[2]) for p in value):
        raise ValueError(f"{name} are not [samples, elements per sample, peak bytes] triples")
    if share is not None and any(p[0] > share for p in value):
        raise ValueError(f"{name} measure more samples than this run's batch of {share}")
    return [(p[0], p[1], p[2]) for p in value]


def _check(condition: bool, problem: str) -> None:
    if not condition:
        raise ValueError(problem)


@dataclass(**KEYWORDS_ONLY)
class PlanRecord:
    """A launch's plan and memory model, as the cache keeps them (one JSON object per key)."""

    #: The largest micro-batch that fitted (the whole batch under bn="exact").
    capacity: int
    #: Measured steps of micro-batches, (samples, elements per sample, peak bytes): the memory model.
    points: list[Point]
    #: Bytes of the fixed part per sample element (autobatch.planning.model).
    resident_per_element: float = 0.0
    #: Phase 1's measured peaks, (samples per chunk, elements per sample, peak bytes), and its fixed part.
    phase1_points: list[Point] = field(default_factory=list)
    phase1_base: float = 0.0
    phase1_chunks: int = 1
    budget_bytes: Optional[int] = None
    #: The mode the plan ran, and bn="exact"'s checkpointing.
    bn: Mode = Mode.TWO_PASS
    checkpointing: Checkpointing = field(default_factory=Checkpointing)
    #: Per sample size, the smallest micro-batch whose trial ran out of memory or passed the budget.
    failed: dict[int, int] = field(default_factory=dict)
    #: Per sample size, the update's measured peak (autobatch.planning.model).
    updates: dict[int, int] = field(default_factory=dict)
    #: Per sample size, precise's segment backward's measured peak (autobatch.planning.model).
    backwards: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "capacity": self.capacity, "points": [list(p) for p in self.points],
                "resident_per_element": self.resident_per_element,
                "phase1_points": [list(p) for p in self.phase1_points], "phase1_base": self.phase1_base,
                "phase1_chunks": self.phase1_chunks, "budget_bytes": self.budget_bytes, "bn": str(self.bn),
                "checkpointed": list(self.checkpointing.modules), "selective": self.checkpointing.selective,
                "label": self.checkpointing.label, "failed": [[s, n] for s, n in sorted(self.failed.items())],
                "updates": [[s, peak] for s, peak in sorted(self.updates.items())],
                "backwards": [[s, peak] for s, peak in sorted(self.backwards.items())]}

    @classmethod
    def from_json(cls, data: Any, share: Optional[int] = None) -> "PlanRecord":
        """The record in ``data``, checked for a run whose rank holds ``share`` samples; ValueError naming
        what makes it unusable."""
        _check(isinstance(data, dict), "not a JSON object")
        _check(data.get("format") == FORMAT, f"format {data.get('format')!r}, not {FORMAT}")
        capacity = data.get("capacity")
        _check(_positive_int(capacity), f"capacity {capacity!r} is not a positive integer")
        _check(share is None or capacity <= share, f"capacity {capacity} is larger than this run's batch of {share}")
        for name in ("resident_per_element", "phase1_base"):
            _check(_size(data.get(name, 0.0)), f"{name} {data.get(name)!r} is not a size in bytes")
        points = _points(data.get("points"), "points", share)
        _check(bool(points), "no point measured")
        phase1_points = _points(data.get("phase1_points", []), "phase1_points", share)
        chunks = data.get("phase1_chunks", 1)
        _check(_positive_int(chunks), f"phase1_chunks {chunks!r} is not a positive integer")
        _check(share is None or chunks <= share, f"phase1_chunks {chunks} is more than this run's batch of {share} samples")
        budget = data.get("budget_bytes")
        _check(budget is None or (_size(budget) and isinstance(budget, int)), f"budget_bytes {budget!r} is not bytes")
        bn = data.get("bn", Mode.TWO_PASS.value)
        _check(bn in {mode.value for mode in Mode}, f"bn {bn!r} is not a mode a plan runs")
        return cls(capacity=capacity, points=points, resident_per_element=float(data.get("resident_per_element", 0.0)),
                   phase1_points=phase1_points, phase1_base=float(data.get("phase1_base", 0.0)), phase1_chunks=chunks,
                   budget_bytes=budget, bn=Mode(bn), checkpointing=_checkpointing(data),
                   failed=_failed(data.get("failed", [])), updates=_updates(data.get("updates", [])),
                   backwards=_updates(data.get("backwards", []), "backwards"))


def _checkpointing(data: dict[str, Any]) -> Checkpointing:
    modules, selective, label = data.get("checkpointed", []), data.get("selective", False), data.get("label", "none")
    _check(isinstance(modules, list) and all(isinstance(name, str) for name in modules),
           "checkpointed is not a list of module names")
    _check(isinstance(selective, bool), f"selective {selective!r} is not true or false")
    _check(isinstance(label, str), f"label {label!r} is not a string")
    return Checkpointing(tuple(modules), selective, label)


def _updates(value: Any, name: str = "updates") -> dict[int, int]:
    _check(isinstance(value, list) and all(isinstance(u, list) and len(u) == 2 and _positive_int(u[0])
                                           and u[0] <= MAX_SIZE and _size(u[1]) for u in value),
           f"{name} are not [elements per sample, peak bytes] pairs")
    return {size: int(peak) for size, peak in value}


def _failed(value: Any) -> dict[int, int]:
    _check(isinstance(value, list) and all(isinstance(f, list) and len(f) == 2 and _positive_int(f[0])
                                           and _positive_int(f[1]) for f in value),
           "failed is not a list of [elements per sample, micro-batch] pairs")
    return {size: n for size, n in value}
