"""The search: the largest micro-batch whose measured peak fits the memory budget, in few trials.

It measures a few real training micro-steps, fits ``peak = fixed + per_sample * n``, predicts the
largest ``n`` under the budget and verifies it once; it bisects only when the verification fails::

    >>> fit = search(measure=lambda n: measured_peak_of_a_step_with(n), budget_bytes=6 * 2**30,
    ...              target_batch=64)
    >>> fit.capacity, fit.trials
    (23, 4)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from autobatch.oom import PlanDoesNotFit
from autobatch.sizes import format_bytes

__all__ = ["Fit", "fitted_line", "largest_under", "search", "shrink"]

Measure = Callable[[int], Optional[int]]


@dataclass(frozen=True)
class Fit:
    """What the search found: the largest micro-batch that fits, the fitted line, and every measured point."""

    capacity: int
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
        return largest_under(self.fixed_bytes, self.per_sample_bytes, budget_bytes, limit)


def largest_under(fixed_bytes: float, per_sample_bytes: float, budget_bytes: int, limit: int) -> int:
    """The largest n in [1, limit] with ``fixed_bytes + n * per_sample_bytes`` at most ``budget_bytes`` (1 when
    even one sample is over it; ``limit`` when a sample costs nothing)."""
    if per_sample_bytes <= 0:
        return limit
    return max(1, min(limit, math.floor((budget_bytes - fixed_bytes) / per_sample_bytes)))


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
    Raises PlanDoesNotFit when not even one sample fits.
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


def _nothing_fits(one_sample: Optional[int], budget_bytes: int) -> PlanDoesNotFit:
    measured = format_bytes(one_sample) if one_sample is not None else "out of memory"
    return PlanDoesNotFit(f"not even a micro-batch of one sample fits the memory budget: one sample's training step "
                          f"peaked at {measured} against a budget of {format_bytes(budget_bytes)}")


def shrink(micro_batch: int) -> int:
    """The next micro-batch to try after running out of memory at ``micro_batch``."""
    if micro_batch <= 1:
        raise PlanDoesNotFit("out of memory with a micro-batch of one sample; nothing smaller to try")
    return max(1, min(micro_batch - 1, math.floor(micro_batch * 0.8)))
