"""The plan: how large a micro-batch is, and how a logical batch is split.

    >>> make_plan(target_batch=16, micro_batch=7)
    Plan(micro_batch=7, splits=[6, 5, 5], source='user', ...)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from autobatch.split import balanced_splits

__all__ = ["Plan", "make_plan", "check_target_batch", "check_micro_batch"]


@dataclass(frozen=True)
class Plan:
    """The micro-batch size in use, the splits of a full logical batch, and how they were chosen."""

    micro_batch: int
    target_batch: int
    source: str
    reason: str
    splits: list[int] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "splits", balanced_splits(self.target_batch, self.micro_batch))

    def __str__(self) -> str:
        rows = [("target_batch", self.target_batch), ("micro_batch", self.micro_batch),
                ("splits", self.splits), ("source", self.source), ("reason", self.reason)]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_target_batch(target_batch: object) -> int:
    if not _is_int(target_batch) or target_batch < 1:
        raise ValueError(f"target_batch must be a positive int (the logical batch size), got {target_batch!r}")
    return target_batch


def check_micro_batch(micro_batch: object) -> Union[int, str]:
    if micro_batch == "auto":
        return micro_batch
    if not _is_int(micro_batch) or micro_batch < 1:
        raise ValueError(f"micro_batch must be 'auto' or a positive int, got {micro_batch!r}")
    return micro_batch


def make_plan(target_batch: int, micro_batch: Union[int, str]) -> Plan:
    """A plan for ``target_batch`` samples per step with ``micro_batch`` ("auto" or an int)."""
    if micro_batch == "auto":
        # The memory planner (measured fit) is not built yet: without it, run the whole batch.
        return Plan(target_batch, target_batch, "auto", "no memory measurement yet: whole batch")
    if micro_batch >= target_batch:
        return Plan(target_batch, target_batch, "user", f"micro_batch={micro_batch} holds the whole batch")
    return Plan(micro_batch, target_batch, "user", f"micro_batch={micro_batch} given")
