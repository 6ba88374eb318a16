"""The plan: the micro-batch in use, how phase 1 runs, the BatchNorm mode that runs, and why.

    >>> plan = fixed_plan(target_batch=16, micro_batch=7)
    >>> plan.capacity, plan.splits, plan.micro_batch      # what fits, the balanced split, what runs
    (7, [6, 5, 5], 6)
    >>> print(plan)                 # every choice and the measurements behind it
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from autobatch.checkpointing import Checkpointing
from autobatch.modes import Boundaries, Mode
from autobatch.sizes import format_bytes
from autobatch.split import balanced_splits

__all__ = ["Candidate", "KEYWORDS_ONLY", "Plan", "candidate_table", "fixed_plan", "format_table"]

#: For a record of many fields, built by name only: ``Plan(capacity=8, ...)``. Python 3.9 has no keyword-only
#: dataclasses; there the fields are still taken by position, and the tests on newer Pythons catch any caller that
#: does so.
KEYWORDS_ONLY: dict[str, Any] = {"kw_only": True} if sys.version_info >= (3, 10) else {}


@dataclass(frozen=True)
class Candidate:
    """One way of running the logical batch the planner measured: a checkpointing policy of the whole
    batch (exact) or two_pass at its largest micro-batch, with the peak (None: out of memory) and time."""

    label: str
    peak_bytes: Optional[int]
    seconds: Optional[float]
    exact: bool


def candidate_table(candidates: tuple[Candidate, ...]) -> str:
    """The measured candidates as a table, for ``python -m autobatch plan``."""
    rows = [("candidate", "peak", "step time", "exact")] + [
        (c.label, format_bytes(c.peak_bytes) if c.peak_bytes is not None else "out of memory",
         f"{c.seconds:.3f} s" if c.seconds is not None else "-", "yes" if c.exact else "no") for c in candidates]
    return format_table(rows)


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Rows of text (the first one the header) as aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in rows)


@dataclass(frozen=True, **KEYWORDS_ONLY)
class Plan:
    """The micro-batch that runs, the splits of a full logical batch, and how they were chosen.

    ``capacity`` is the largest micro-batch that fits (the budget's, or the one given); the logical batch
    is cut into balanced ``splits`` of at most that many samples, and ``micro_batch`` is the largest
    split: the micro-batch that runs. 16 samples with a capacity of 7 run as 6, 5 and 5."""

    capacity: int
    """The largest micro-batch that fits: the budget's (measured), or the one given."""
    target_batch: int
    """The logical batch over all ranks."""
    source: str
    """Where the plan came from: "measured", "cache" or "user"."""
    reason: str
    """Why this micro-batch, in words (and what running out of memory changed)."""
    device: str = ""
    """The device measured, and how (NVML, CUDA, psutil)."""
    budget_bytes: Optional[int] = None
    """The budget the plan keeps under: the device's free memory or ``memory_budget``, less a 10% margin."""
    predicted_peak_bytes: Optional[int] = None
    """The memory model's peak for a step at ``micro_batch`` samples of ``sample_size`` elements."""
    points: tuple[tuple[int, Optional[int]], ...] = ()
    """The planning trials, (samples, peak bytes or None where out of memory)."""
    trials: int = 0
    """How many trial steps the plan took."""
    phase1_chunks: int = 1
    """two_pass's phase 1 in this many pieces: 1 is the whole batch at once; more, each piece normalized with its
    own statistics (approximate), where the whole batch does not fit."""
    world_size: int = 1
    """The ranks the logical batch is shared by."""
    bn: Mode = Mode.TWO_PASS
    """The BatchNorm mode that runs (bn="auto" chooses one)."""
    gradient: str = ""
    """The gradient a step computes, in words: the full batch's exact one ("precise", "exact") or not."""
    update_copy_bytes: int = 0
    """Device bytes of the optimizer update's undo copies (``update_copies``), part of every predicted peak."""
    checkpointing: Checkpointing = Checkpointing()
    """bn="exact": the submodules checkpointed during a step."""
    not_precise: Optional[str] = None
    """two_pass: why its precise backward does not run under this plan (its segment backward does not fit the
    memory); None where it may."""
    boundaries: Boundaries = Boundaries.GROUPED
    """precise: which of phase 1's tensors its segment backward keeps; every boundary (no forward recomputed)
    where the memory model predicts it fits beside the rest of the step."""
    boundary_bytes: int = 0
    """precise keeping every boundary (and recomputing whole segments): the bytes that holds beyond the grouped
    layout's, part of the predicted peak."""
    candidates: tuple[Candidate, ...] = ()
    """bn="exact" or "auto": every policy measured, with the whole batch's peak and step time."""
    sample_size: int = 0
    """Elements per sample of the batch this plan is for; 0 before any batch."""
    memory_model: str = ""
    """The memory model the micro-batch comes from, in words, at ``sample_size``."""
    fixed_bytes: Optional[float] = None
    """The model's fixed part at ``sample_size``: what a micro-batch's step holds whatever its size."""
    per_sample_bytes: Optional[float] = None
    """The model's bytes per sample at ``sample_size``."""
    measured: tuple[tuple[int, int, int], ...] = ()
    """Every step the model was fitted to: (samples, elements per sample, peak bytes)."""
    splits: list[int] = field(init=False)
    """One rank's share of a full logical batch, cut into balanced micro-batches of at most ``capacity``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "bn", Mode(self.bn))
        if self.phase1_chunks < 1:
            raise ValueError(f"phase1_chunks must be 1 or more, got {self.phase1_chunks}")
        # The splits of one rank's share of a full logical batch.
        object.__setattr__(self, "splits", balanced_splits(self.target_batch // self.world_size, self.capacity))

    @property
    def micro_batch(self) -> int:
        """The micro-batch that runs: the largest of the balanced splits, at most ``capacity``."""
        return max(self.splits)

    def replace(self, **changes) -> "Plan":
        """A copy of the plan with ``changes`` (its fields by name) applied."""
        return dataclasses.replace(self, **changes)

    @property
    def checkpointed(self) -> tuple[str, ...]:
        """The qualified names of the submodules checkpointed during a step; empty when none."""
        return self.checkpointing.modules

    def __str__(self) -> str:
        target = self.target_batch if self.world_size == 1 else (
            f"{self.target_batch} ({self.target_batch // self.world_size} on each of {self.world_size} ranks)")
        runs = "given" if self.source == "user" and self.capacity == self.micro_batch else \
            "the largest micro-batch that runs"
        rows = [("target_batch", target), ("bn", f"{self.bn} ({self.gradient})" if self.gradient else str(self.bn)),
                ("micro_batch", f"{self.micro_batch} ({runs})")]
        if self.capacity != self.micro_batch:
            fits = "the budget allows" if self.budget_bytes is not None else "given"
            rows.append(("capacity", f"{self.capacity} (the largest micro-batch {fits})"))
        rows += [("splits", self.splits), ("source", self.source), ("reason", self.reason)]
        if self.bn is Mode.EXACT:
            rows.append(("checkpointed", _listing(self.checkpointing)))
        if self.device:
            rows.append(("device", self.device))
        if self.budget_bytes is not None:
            rows.append(("budget", format_bytes(self.budget_bytes)))
        if self.predicted_peak_bytes is not None:
            rows.append(("predicted peak", f"{format_bytes(self.predicted_peak_bytes)} (at micro_batch "
                                           f"{self.micro_batch})"))
        if self.update_copy_bytes:
            rows.append(("undo copies", f"{format_bytes(self.update_copy_bytes)}, to undo a failed optimizer update "
                                          "(update_copies='host' keeps them in host memory, 'none' takes none)"))
        if self.points:
            rows.append(("measured", ", ".join(
                f"{n}: {format_bytes(peak) if peak is not None else 'out of memory'}" for n, peak in self.points)))
            rows.append(("trials", self.trials))
        if self.boundaries is Boundaries.EVERY:
            rows.append(("precise keeps", f"every boundary, {format_bytes(self.boundary_bytes)} more than grouped: "
                                          "no forward recomputed in the segment backward"))
        elif self.boundaries is Boundaries.WHOLE_SEGMENTS:
            rows.append(("precise keeps", f"every boundary, and recomputes each segment for the whole batch at once, "
                                          f"{format_bytes(self.boundary_bytes)} more than grouped"))
        elif self.boundaries is Boundaries.HOST:
            rows.append(("precise keeps", "every boundary in host memory, its rows brought back as the segment "
                                          "backward reads them"))
        if self.phase1_chunks > 1:
            rows.append(("phase 1", f"{self.phase1_chunks} chunks: its statistics are approximate (each chunk "
                                    "normalized with its own)"))
        if self.sample_size:
            rows.append(("sample size", f"{self.sample_size} elements per sample (the last batch's)"))
        if self.memory_model:
            rows.append(("memory model", self.memory_model))
        width = max(len(name) for name, _ in rows)
        text = "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
        return text + ("\n" + candidate_table(self.candidates) if self.candidates else "")


def _listing(policy: Checkpointing) -> str:
    if not policy:
        return "none"
    names = ", ".join(policy.modules[:6]) + (f" and {len(policy.modules) - 6} more" if len(policy.modules) > 6 else "")
    return f"{len(policy.modules)} modules ({policy.label}): {names}"


def fixed_plan(target_batch: int, micro_batch: int, world_size: int = 1, bn: Mode = Mode.TWO_PASS) -> Plan:
    """The plan for a micro-batch size the user chose (``target_batch`` over all ``world_size`` ranks)."""
    share = target_batch // world_size
    reason = f"micro_batch={micro_batch} holds the whole batch" if micro_batch >= share else f"micro_batch={micro_batch} given"
    return Plan(capacity=min(micro_batch, share), target_batch=target_batch, source="user", reason=reason,
                world_size=world_size, bn=bn)
