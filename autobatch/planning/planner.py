"""The planner: choose the largest micro-batch whose measured peak fits the memory budget.

It measures a few real training micro-steps, fits ``peak = fixed + per_sample * n``, predicts the
largest ``n`` under the budget and verifies it once; it bisects only when the verification fails::

    >>> fit = search(measure=lambda n: measured_peak_of_a_step_with(n), budget_bytes=6 * 2**30,
    ...              target_batch=64)
    >>> fit.micro_batch, fit.trials
    (23, 4)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Union

from autobatch.checkpointing import Checkpointing
from autobatch.planning.memory import format_bytes
from autobatch.split import balanced_splits

__all__ = ["Candidate", "Fit", "Phase1", "Plan", "candidate_table", "check_micro_batch", "check_target_batch",
           "fitted_line", "fixed_plan", "search", "shrink"]

Measure = Callable[[int], Optional[int]]


@dataclass(frozen=True)
class Phase1:
    """How two_pass's phase 1 runs: over the whole batch at once, in ``chunks`` pieces (each normalized
    with its own statistics: approximate), or alongside the first micro-batch (autobatch.batchnorm.lockstep).
    Made by :meth:`whole`, :meth:`chunked` or :meth:`alongside`."""

    kind: Literal["whole", "chunked", "lockstep"] = "whole"
    chunks: int = 1

    def __post_init__(self) -> None:
        if (self.kind == "chunked") != (self.chunks > 1) or self.chunks < 1:
            raise ValueError(f"phase 1 {self.kind} with {self.chunks} chunks; use Phase1.whole(), "
                             "Phase1.chunked(n) with n > 1, or Phase1.alongside()")

    @classmethod
    def whole(cls) -> "Phase1":
        return cls("whole")

    @classmethod
    def chunked(cls, chunks: int) -> "Phase1":
        """``chunks`` pieces; one piece is the whole batch."""
        return cls("chunked", chunks) if chunks > 1 else cls("whole")

    @classmethod
    def alongside(cls) -> "Phase1":
        return cls("lockstep")

    @property
    def lockstep(self) -> bool:
        return self.kind == "lockstep"

    def __str__(self) -> str:
        if self.kind == "lockstep":
            return "alongside the first micro-batch (lockstep)"
        if self.kind == "chunked":
            return f"{self.chunks} chunks: its statistics are approximate (each chunk normalized with its own)"
        return "the whole batch at once"


@dataclass(frozen=True)
class Plan:
    """The micro-batch size in use, the splits of a full logical batch, and how they were chosen."""

    micro_batch: int
    target_batch: int
    source: str
    reason: str
    device: str = ""
    budget_bytes: Optional[int] = None
    predicted_peak_bytes: Optional[int] = None
    points: tuple[tuple[int, Optional[int]], ...] = ()
    trials: int = 0
    #: How two_pass's phase 1 runs.
    phase1: Phase1 = Phase1()
    world_size: int = 1
    #: The BatchNorm mode that runs ("two_pass", "micro", "exact"; bn="auto" chooses one).
    bn: str = "two_pass"
    #: bn="exact": the submodules checkpointed during a step.
    checkpointing: Checkpointing = Checkpointing()
    #: bn="exact" or "auto": every policy measured, with the whole batch's peak and step time.
    candidates: tuple[Candidate, ...] = ()
    splits: list[int] = field(init=False)

    def __post_init__(self) -> None:
        # The splits of one rank's share of a full logical batch.
        object.__setattr__(self, "splits", balanced_splits(self.target_batch // self.world_size,
                                                           self.micro_batch))

    def replace(self, **changes) -> "Plan":
        return dataclasses.replace(self, **changes)

    @property
    def checkpointed(self) -> tuple[str, ...]:
        """The qualified names of the submodules checkpointed during a step; empty when none."""
        return self.checkpointing.modules

    def __str__(self) -> str:
        target = self.target_batch if self.world_size == 1 else (
            f"{self.target_batch} ({self.target_batch // self.world_size} on each of {self.world_size} ranks)")
        rows = [("target_batch", target), ("bn", self.bn),
                ("micro_batch", f"{max(self.splits)} (the largest micro-batch that runs)")]
        if self.budget_bytes is not None:
            rows.append(("capacity", f"{self.micro_batch} samples (the largest micro-batch the budget allows)"))
        rows += [("splits", self.splits), ("source", self.source), ("reason", self.reason)]
        if self.bn == "exact":
            rows.append(("checkpointed", _listing(self.checkpointing)))
        if self.device:
            rows.append(("device", self.device))
        if self.budget_bytes is not None:
            rows.append(("budget", format_bytes(self.budget_bytes)))
        if self.predicted_peak_bytes is not None:
            rows.append(("predicted peak", format_bytes(self.predicted_peak_bytes)))
        if self.points:
            rows.append(("measured", ", ".join(
                f"{n}: {format_bytes(peak) if peak is not None else 'out of memory'}" for n, peak in self.points)))
            rows.append(("trials", self.trials))
        if self.phase1 != Phase1.whole():
            rows.append(("phase 1", str(self.phase1)))
        width = max(len(name) for name, _ in rows)
        text = "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
        return text + ("\n" + candidate_table(self.candidates) if self.candidates else "")


def _listing(policy: Checkpointing) -> str:
    if not policy:
        return "none"
    names = ", ".join(policy.modules[:6]) + (f" and {len(policy.modules) - 6} more" if len(policy.modules) > 6 else "")
    return f"{len(policy.modules)} modules ({policy.label}): {names}"


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
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in rows)


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


def fixed_plan(target_batch: int, micro_batch: int, world_size: int = 1, phase1: Phase1 = Phase1(),
               bn: str = "two_pass") -> Plan:
    """The plan for a micro-batch size the user chose (``target_batch`` over all ``world_size`` ranks)."""
    share = target_batch // world_size
    reason = f"micro_batch={micro_batch} holds the whole batch" if micro_batch >= share else f"micro_batch={micro_batch} given"
    return Plan(min(micro_batch, share), target_batch, "user", reason, phase1=phase1, world_size=world_size, bn=bn)


@dataclass(frozen=True)
class Fit:
    """What the search found: the micro-batch, the fitted line, and every measured point."""

    micro_batch: int
    fixed_bytes: float
    per_sample_bytes: float
    points: tuple[tuple[int, Optional[int]], ...]

    @property
    def trials(self) -> int:
        return len(self.points)

    def predict(self, n: int) -> int:
        return int(self.fixed_bytes + self.per_sample_bytes * n)

    def largest_under(self, budget_bytes: int, limit: int) -> int:
        """The largest n in [1, limit] whose predicted peak is at most ``budget_bytes``."""
        if self.per_sample_bytes <= 0:
            return limit
        return max(1, min(limit, math.floor((budget_bytes - self.fixed_bytes) / self.per_sample_bytes)))


def fitted_line(points: dict[int, int]) -> tuple[float, float]:
    """Least-squares fixed + per_sample * n through the points (one point: through the origin)."""
    ns, peaks = list(points), list(points.values())
    if len(ns) == 1:
        return 0.0, peaks[0] / ns[0]
    mean_n, mean_peak = sum(ns) / len(ns), sum(peaks) / len(peaks)
    spread = sum((n - mean_n) ** 2 for n in ns)
    slope = sum((n - mean_n) * (p - mean_peak) for n, p in zip(ns, peaks)) / spread
    return mean_peak - slope * mean_n, slope


def search(measure: Measure, budget_bytes: int, target_batch: int) -> Fit:
    """The largest micro-batch in [1, target_batch] whose measured peak is at most ``budget_bytes``.

    ``measure(n)`` runs one real training micro-step of ``n`` samples and returns its peak bytes,
    or None when it ran out of memory. Typically 2 points, 1 point near the answer, 1 verification.
    Raises MemoryError when not even one sample fits.
    """
    measured: dict[int, Optional[int]] = {}

    def fits(n: int) -> bool:
        if n not in measured:
            measured[n] = measure(n)
        peak = measured[n]
        return peak is not None and peak <= budget_bytes

    def result(n: int) -> Fit:
        good = {k: v for k, v in measured.items() if v is not None}
        fixed, per_sample = fitted_line(good)
        return Fit(n, fixed, per_sample, tuple(sorted(measured.items())))

    for n in sorted({min(2, target_batch), min(4, target_batch)}):
        if not fits(n):
            good = _bisect(fits, 0, n)
            if not good:
                raise _nothing_fits(measured.get(1), budget_bytes)
            return result(good)
    largest_good = max(measured)
    guess = result(0).largest_under(budget_bytes, target_batch)
    if guess > 2 * largest_good:
        # A third point near the answer, where the line matters most.
        if not fits(guess // 2):
            return result(_bisect(fits, largest_good, guess // 2))
        largest_good = guess // 2
        guess = result(0).largest_under(budget_bytes, target_batch)
    best = largest_good
    for _ in range(3):  # the verification is a new point: refit, and try again while the line allows more
        if guess <= best:
            break
        if not fits(guess):
            return result(_bisect(fits, best, guess))
        best = guess
        guess = result(0).largest_under(budget_bytes, target_batch)
    return result(best)


def _bisect(fits: Callable[[int], bool], good: int, bad: int) -> int:
    """The largest n in [good, bad) that fits, given that ``good`` fits (0: nothing known, and 0 returned
    when nothing does) and ``bad`` does not."""
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def _nothing_fits(one_sample: Optional[int], budget_bytes: int) -> MemoryError:
    measured = format_bytes(one_sample) if one_sample is not None else "out of memory"
    return MemoryError(f"not even a micro-batch of one sample fits the memory budget: one sample's training step "
                       f"peaked at {measured} against a budget of {format_bytes(budget_bytes)}")


def shrink(micro_batch: int) -> int:
    """The next micro-batch to try after running out of memory at ``micro_batch``."""
    if micro_batch <= 1:
        raise MemoryError("out of memory with a micro-batch of one sample; nothing smaller to try")
    return max(1, min(micro_batch - 1, math.floor(micro_batch * 0.8)))
