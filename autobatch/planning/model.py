"""The memory model: a step's peak for ``n`` samples of ``s`` elements each, from measured steps.

    model = MemoryModel(resident_per_element=0.0)
    model.add(n=2, s=3072, peak=...)             # trials, and real steps measured at new sizes
    model.add(n=4, s=3072, peak=...)
    model.predict(n=8, s=12288)                  # fixed(s) + n * per_sample(s)
    model.largest_under(budget_bytes, s=12288, limit=32)

``peak = max(fixed(s) + n * per_sample(s), update(s))``: the micro-batches' forward and backward, and the
optimizer's update after them, measured apart, since the update runs once the activations are gone and
shares no memory with them (a model with many parameters and few activations peaks in its update: its
micro-batches' peaks alone tell how they grow). ``fixed(s)`` is what a micro-batch's step holds whatever its micro-batch:
parameters, gradients, optimizer state and the update's copies (``base``), plus what grows with the
sample size but not with ``n`` (two_pass keeps the whole batch's inputs and phase 1's random draws:
``resident_per_element * s``). ``per_sample(s)`` is a micro-batch's activations per sample, measured
at every sample size seen: linear in ``s`` (convolutions), or quadratic where the measurements ask for
it (attention without fused kernels grows with the square of a sequence's length). Between measured
sizes the fit is used; beyond them a bound that holds for any such growth, until a step at that size
has been measured: above the largest size ``per_sample`` grows at most with the square of ``s``, below
the smallest it is at most the smallest size's. So a step at a new size never passes the budget, and
after one measured step it gets the largest micro-batch the fit allows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from autobatch.planning.search import fitted_line, largest_under
from autobatch.sizes import format_bytes

__all__ = ["MemoryModel"]

#: The linear fit of per-sample memory over sample sizes is kept unless it misses a measured size by
#: more than this share and the quadratic fit misses by less than half of it.
LINEAR_TOLERANCE = 0.02


def _solve(rows: list[list[float]], values: list[float]) -> Optional[list[float]]:
    """Least squares by the normal equations (a handful of points, two or three unknowns)."""
    k = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) for j in range(k)] + [sum(r[i] * v for r, v in zip(rows, values))]
         for i in range(k)]
    for col in range(k):
        pivot = max(range(col, k), key=lambda row: abs(a[row][col]))
        if abs(a[pivot][col]) < 1e-12 * max(1.0, max(abs(x) for x in a[pivot][:k])):
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for row in range(k):
            if row != col:
                factor = a[row][col] / a[col][col]
                a[row] = [x - factor * y for x, y in zip(a[row], a[col])]
    return [a[i][k] / a[i][i] for i in range(k)]


@dataclass
class MemoryModel:
    """Measured peaks ``(n, s, peak)`` and the fit through them (module docstring)."""

    #: Bytes of the fixed part per element of one sample (the whole batch's resident inputs, phase 1's draws).
    resident_per_element: float = 0.0
    points: list[tuple[int, int, int]] = field(default_factory=list)
    #: The fixed part where no sample size has two micro-batch sizes measured (phase 1 measured whole):
    #: what the model knows to be resident anyway.
    base_hint: float = 0.0
    #: Per sample size, the update's measured peak (gradients, optimizer state, its undo copies, temporaries).
    updates: dict[int, int] = field(default_factory=dict)
    #: Per sample size, precise's segment backward's measured peak: whole-batch tensors at its cuts, whatever the
    #: micro-batch (autobatch.batchnorm.segment_run).
    backwards: dict[int, int] = field(default_factory=dict)

    def add_backward(self, s: int, peak: int) -> None:
        """A measured peak of the segment backward at ``s`` (the larger of it and an earlier one is kept)."""
        self.backwards[s] = max(int(peak), self.backwards.get(s, 0))

    def backward(self, s: int) -> float:
        """The segment backward's peak at ``s``: what it held above the fixed part at a measured size, grown as a
        sample's activations grow (the fit, or its bound beyond the measured sizes); 0 where none was measured."""
        if not self.backwards or not self.points:
            return float(max(self.backwards.values(), default=0))
        growth = {size: self.per_sample(s) / max(self.per_sample(size), 1.0) for size in self.backwards}
        return max(self.fixed(s) + max(0.0, peak - self.fixed(size)) * growth[size]
                   for size, peak in self.backwards.items())

    def add_update(self, s: int, peak: int) -> None:
        """A measured peak of the update at sample size ``s`` (the larger of it and an earlier one is kept)."""
        self.updates[s] = max(int(peak), self.updates.get(s, 0))

    def update(self, s: int) -> float:
        """The update's peak at ``s``: its largest measurement, less what grows with the samples, plus that at
        ``s`` (0 where none was measured)."""
        if not self.updates:
            return 0.0
        resident = self.resident_per_element
        return max(peak - resident * size for size, peak in self.updates.items()) + resident * s

    def add(self, n: int, s: int, peak: int) -> None:
        """A measured peak of a step of ``n`` samples of ``s`` elements (replacing an older one of the same n, s)."""
        self.points = [p for p in self.points if (p[0], p[1]) != (n, s)] + [(n, s, int(peak))]

    @property
    def sizes(self) -> list[int]:
        return sorted({s for _, s, _ in self.points})

    def covers(self, s: int) -> bool:
        """Whether ``s`` lies within the measured sample sizes (the fit, not a bound, applies)."""
        sizes = self.sizes
        return bool(sizes) and sizes[0] <= s <= sizes[-1]

    # -- the fit ----------------------------------------------------------------------------------

    def _lines(self) -> dict[int, tuple[float, float]]:
        """Per sample size with two or more micro-batch sizes measured: its own (fixed, per_sample) line."""
        lines = {}
        for s in self.sizes:
            at = {n: peak for n, size, peak in self.points if size == s}
            if len(at) >= 2:
                lines[s] = fitted_line(at)
        return lines

    @property
    def base(self) -> float:
        """The fixed part that does not grow with the sample size, from the sizes with a line of their own."""
        lines = self._lines()
        if not lines:
            return self.base_hint
        return min(fixed - self.resident_per_element * s for s, (fixed, _) in lines.items())

    def fixed(self, s: int) -> float:
        return self.base + self.resident_per_element * s

    def _per_sample_at(self) -> dict[int, float]:
        """Per measured sample size, the per-sample bytes: its line's slope, or its points over the fixed part."""
        lines, base = self._lines(), self.base
        found = {}
        for s in self.sizes:
            if s in lines:
                found[s] = max(0.0, lines[s][1])
            else:
                found[s] = max(max(0.0, (peak - base - self.resident_per_element * s) / n)
                               for n, size, peak in self.points if size == s)
        return found

    def form(self) -> tuple[str, list[float]]:
        """("proportional" | "linear" | "quadratic", coefficients of per_sample in s), from the measurements."""
        at = self._per_sample_at()
        sizes = sorted(at)
        if len(sizes) == 1:
            return "proportional", [0.0, at[sizes[0]] / sizes[0], 0.0]
        values = [at[s] for s in sizes]
        linear = _solve([[1.0, float(s)] for s in sizes], values) or [values[0], 0.0]
        linear.append(0.0)
        if len(sizes) >= 3:
            quadratic = _solve([[1.0, float(s), float(s) ** 2] for s in sizes], values)
            if quadratic is not None and quadratic[2] > 0:
                miss = self._miss(linear, at)
                if miss > LINEAR_TOLERANCE and self._miss(quadratic, at) < miss / 2:
                    return "quadratic", quadratic
        return "linear", linear

    @staticmethod
    def _miss(coefficients: list[float], at: dict[int, float]) -> float:
        """The largest relative miss of a fit at the measured sizes."""
        a, b, c = coefficients
        return max(abs(a + b * s + c * s * s - value) / max(value, 1.0) for s, value in at.items())

    def per_sample(self, s: int) -> float:
        """Bytes per sample of ``s`` elements: the fit within the measured sizes, a bound beyond them."""
        at = self._per_sample_at()
        if not at:
            raise ValueError("the memory model has no measurement yet")
        smallest, largest = min(at), max(at)
        if s < smallest:
            return at[smallest]  # activations do not grow as samples shrink
        if s > largest:
            # No faster than quadratic growth from the largest measured size: a bound, until measured.
            return at[largest] * (s / largest) ** 2
        _, (a, b, c) = self.form()
        return max(0.0, a + b * s + c * s * s)

    def predict(self, n: int, s: int) -> int:
        return int(max(self.fixed(s) + n * self.per_sample(s), self.update(s)))

    def largest_under(self, budget_bytes: int, s: int, limit: int) -> int:
        """The largest ``n`` in [1, limit] whose predicted peak at ``s`` is at most ``budget_bytes`` (1
        when even one sample, or the update, is predicted over it: the step then measures, or runs out of memory)."""
        if self.update(s) > budget_bytes:
            return 1
        return largest_under(self.fixed(s), self.per_sample(s), budget_bytes, limit)

    def describe(self, s: Optional[int] = None) -> str:
        """The model in words, at ``s`` elements per sample (default: the largest measured)."""
        sizes = self.sizes
        if not sizes:
            return "nothing measured yet"
        s = sizes[-1] if s is None else s
        form, _ = self.form()
        measured = ", ".join(str(size) for size in sizes)
        growth = {"proportional": f"measured at {measured} elements per sample; other sizes bounded until measured",
                  "linear": f"linear in the sample size, measured at {measured} elements per sample",
                  "quadratic": f"quadratic in the sample size, measured at {measured} elements per sample"}[form]
        update = f"; the optimizer update after them peaks at {format_bytes(self.update(s))}" if self.updates else ""
        if self.backwards:
            update += f"; precise's segment backward at {format_bytes(self.backward(s))}"
        return (f"{format_bytes(self.fixed(s))} + {format_bytes(self.per_sample(s))} per sample, for samples of {s} "
                f"elements (per sample: {growth}){update}")
