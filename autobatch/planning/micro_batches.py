"""Sizing in micro-batches (bn="two_pass", "micro"): the largest micro-batch the memory model fits under the
budget at each sample size, and two_pass's phase 1 in as few chunks as fit.

    sizing = MicroBatchSizing(planner, strategy)
    plan = sizing.measure(batch)                  # the search's trials, then phase 1's
    plan = sizing.for_size(plan, s=12288)         # capacity and phase-1 chunks at another sample size
"""
from __future__ import annotations

import math
from typing import Any, Optional

from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.oom import PlanDoesNotFit
from autobatch.plan import Plan
from autobatch.planning.measure import tensor_bytes, warm_optimizer_state
from autobatch.planning.model import MemoryModel
from autobatch.planning.search import search, shrink
from autobatch.planning.sizing import Sizing
from autobatch.sizes import format_bytes
from autobatch.split import balanced_splits
from autobatch.stages import Stage
from autobatch.transaction import trial_transaction

__all__ = ["MicroBatchSizing"]

Point = tuple[int, int, int]


class MicroBatchSizing(Sizing):
    """Micro-batches of the mode of ``strategy``, with phase 1 where the strategy runs one."""

    def __init__(self, planner: Any, strategy: BatchNormStrategy):
        self.planner = planner
        self.strategy = strategy

    def _has_phase1(self, capacity: int) -> bool:
        return capacity < self.planner.share and self.strategy.needs_phase1()

    # -- the start -------------------------------------------------------------------------------

    def _nothing_fits(self, error: str, batch: Any) -> str:
        """Why not even one sample fits, in words: what the memory holds, and the undo copies where one sample's
        step without them fits (measured by one more trial)."""
        p = self.planner
        resident, copies = tensor_bytes(p.micro.model, p.micro.optimizer), p.micro.undo_copy_bytes()
        held = (f"{error}; of it, {format_bytes(resident)} are parameters, gradients, buffers and optimizer state, and "
                f"{format_bytes(copies)} the update's undo copies")
        without = None
        if copies:
            kept, p.micro.update_copies = p.micro.update_copies, "none"
            try:
                without = p.trials.micro_step_peak(batch, 1)
            finally:
                p.micro.update_copies = kept
        if without is not None and without <= p.limit.budget_bytes:
            host = "" if p.micro.device.type == "cpu" else \
                "update_copies='host' (the copies in host memory, a copy to the host per step) or "
            return (f"{held}, without which one sample would fit: pass {host}update_copies='none' (no copies: an "
                    "update that runs out of memory half-way can then not be undone, and the step raises instead of "
                    "being taken again)")
        return f"{held}. Raise memory_budget, free memory on the device, or use a smaller model, input or optimizer state"

    def measure(self, batch: Any) -> Plan:
        """The largest micro-batch whose measured step fits, and phase 1 in as few chunks as fit; the memory
        model starts from these measurements."""
        p = self.planner
        with trial_transaction(p.micro.model, p.micro.optimizer):
            warm_optimizer_state(p.micro.optimizer)
            s = p.micro.batches.sample_size(batch)
            stages: dict[int, tuple[int, int]] = {}  # per n: the forward and backward's peak, the update's

            def peak(n: int) -> Optional[int]:
                peaks = p.trials.micro_step_peaks(batch, n)
                if peaks is not None:
                    stages[n] = peaks
                return None if peaks is None else max(peaks)

            try:
                fit = search(peak, p.limit.budget_bytes, p.share)
            except PlanDoesNotFit as error:
                raise PlanDoesNotFit(self._nothing_fits(str(error), batch)) from None
            draws, phase1_points = 0, []
            if self._has_phase1(fit.capacity):
                phase1_points = self._fit_phase1(batch, s)
                # Phase 1's random draws stay resident through every micro-batch (autobatch.batchnorm.randomness).
                draws = self.strategy.take_draw_bytes()
        p.draws_per_element = draws / s
        over = [n for n, peak in fit.points if peak is None or peak > p.limit.budget_bytes]
        if over:  # a trial that ran out of memory or passed the budget bounds this size from above
            p.failed[s] = min(over)
        p.model = MemoryModel(self._resident_per_element(batch, s, draws),
                              [(n, s, forward_backward + draws) for n, (forward_backward, _) in stages.items()],
                              updates={s: max(update for _, update in stages.values()) + draws})
        p.phase1 = MemoryModel(p.model.resident_per_element, phase1_points, p.model.base) if phase1_points else None
        base = Plan(fit.capacity, p.options.target_batch, "measured", "", p.device, p.limit.budget_bytes,
                    points=fit.points, trials=p.trials.steps, world_size=p.ranks.world_size,
                    bn=self.strategy.split_mode)
        return self.for_size(base, s, batch)

    def _resident_per_element(self, batch: Any, s: int, draws: int) -> float:
        """Bytes per sample element of what a step keeps whatever its micro-batch: phase 1's random draws,
        and on a GPU two_pass's whole batch of inputs, moved there once for phase 1."""
        p = self.planner
        resident = draws / s
        if self.strategy.needs_phase1() and p.micro.device.type != "cpu":
            inputs = sum(t.element_size() * t.numel() for t in p.micro.batches.tensors(batch))
            resident += p.share * inputs / p.micro.batches.size(batch) / s
        return resident

    def _fit_phase1(self, batch: Any, s: int) -> list[Point]:
        """Phase 1 (no-grad forward of the whole batch) measured in 1, 2, 4... chunks until it fits:
        (samples per chunk, s, peak) of each."""
        p = self.planner
        points, chunks = [], 1
        while True:
            peak = p.trials.peak(p.trials.phase1(batch, chunks), f"phase 1 in {chunks} chunk(s)", batch)
            if peak is not None:
                points.append((math.ceil(p.share / chunks), s, peak))
            if peak is not None and peak <= p.limit.budget_bytes:
                return points
            if chunks >= p.share:
                raise PlanDoesNotFit("phase 1 of two_pass does not fit the memory budget even one sample at a time; "
                                     "use bn='micro', or raise memory_budget")
            chunks = min(p.share, chunks * 2)

    def from_record(self, base: Plan, batch: Any, path: str) -> Optional[Plan]:
        if base.bn is not self.strategy.split_mode:
            return None
        return self.for_size(base, self.planner.micro.batches.sample_size(batch), batch)

    # -- every batch -----------------------------------------------------------------------------

    def for_batch(self, plan: Plan, batch: Any, s: int) -> tuple[Plan, bool]:
        p = self.planner
        measure = p.micro.device.type == "cuda" or not p.model.covers(s) or (
            p.phase1 is not None and plan.capacity < p.share and not p.phase1.covers(s))
        return p.recovery.capped(self.for_size(plan, s, batch)), measure

    def for_size(self, plan: Plan, s: int, batch: Any = None) -> Plan:
        """``plan`` for batches of ``s`` elements per sample: the model's largest micro-batch, and phase 1
        in as few chunks as the model says fit (``batch``: to measure phase 1 where the model cannot tell)."""
        p = self.planner
        model = p.model
        capacity = model.largest_under(p.limit.budget_bytes, s, p.share)
        if s in p.failed and capacity >= p.failed[s]:
            capacity = max(1, p.failed[s] - 1)  # never what a trial at this size saw fail
        chunks = 1
        if self._has_phase1(capacity):
            self._learn_phase1(batch, s)
            # Phase 1 not measured yet (FSDP2, after the start): chunks no larger than a training micro-batch,
            # whose memory bounds a no-grad forward's, until the step measures it.
            chunks = self._chunks(s) if p.phase1 is not None else math.ceil(p.share / capacity)
        bounded = "" if model.covers(s) else " (beyond the measured sizes: a bound until this size is measured)"
        reason = (f"largest micro-batch the memory model predicts under {p.limit.describe()} for samples of {s} "
                  f"elements: {format_bytes(model.per_sample(s))} per sample{bounded}")
        runs = max(balanced_splits(p.share, capacity))
        return plan.replace(capacity=capacity, reason=reason, predicted_peak_bytes=model.predict(runs, s),
                            phase1_chunks=chunks, **described(model, s))

    def _learn_phase1(self, batch: Any, s: int) -> None:
        """Phase 1 measured by a trial at the first sample size that splits the batch; at later sizes the
        real steps measure it (beyond the measured sizes a bound decides its chunks until then)."""
        p = self.planner
        if p.phase1 is not None or batch is None or p.micro.collective:
            return
        with trial_transaction(p.micro.model, p.micro.optimizer):
            warm_optimizer_state(p.micro.optimizer)
            points = self._fit_phase1(batch, s)
            draws = self.strategy.take_draw_bytes()
        if draws and not p.draws_per_element:
            # Phase 1's draws stay resident through the micro-batches: the model's fixed part grows with s.
            p.draws_per_element = draws / s
            p.model.resident_per_element += draws / s
        p.phase1 = MemoryModel(p.model.resident_per_element, list(points), p.model.base)

    def _chunks(self, s: int) -> int:
        """The fewest chunks (1, 2, 4...) whose phase 1 the model predicts under the budget."""
        p = self.planner
        chunks = 1
        while chunks < p.share and p.phase1.predict(math.ceil(p.share / chunks), s) > p.limit.budget_bytes:
            chunks = min(p.share, chunks * 2)
        return chunks

    def learn(self, plan: Plan, batch: Any, s: int) -> bool:
        """The micro-batch the model predicts at ``s`` verified by a trial (and the fit corrected, up to three
        times), and phase 1 measured."""
        p = self.planner
        if p.model.covers(s) or p.micro.collective:
            return False
        budget_bytes = p.limit.budget_bytes
        with trial_transaction(p.micro.model, p.micro.optimizer):
            warm_optimizer_state(p.micro.optimizer)
            tried = set()
            for _ in range(3):
                n = p.model.largest_under(budget_bytes, s, p.share)
                if n in tried:
                    break
                tried.add(n)
                peaks = p.trials.micro_step_peaks(batch, n)
                draws = p.draws_per_element * s
                p.model.add(n, s, (peaks[0] if peaks is not None else 2 * budget_bytes) + draws)
                if peaks is not None:
                    p.model.add_update(s, peaks[1] + draws)
        if p.phase1 is not None and not p.phase1.covers(s) and self._has_phase1(p.model.largest_under(budget_bytes, s, p.share)):
            with trial_transaction(p.micro.model, p.micro.optimizer):
                for point in self._fit_phase1(batch, s):
                    p.phase1.add(*point)
        return True

    # -- after running out of memory -------------------------------------------------------------

    def after_out_of_memory(self, plan: Plan, stage: Stage, message: str) -> Plan:
        """More phase-1 chunks if phase 1 ran out of memory, else a smaller micro-batch; kept for this sample
        size until ``grow_after`` clean steps."""
        recovery = self.planner.recovery
        if stage is Stage.PHASE1:
            chunks = min(self.planner.share, plan.phase1_chunks * 2)
            if chunks == plan.phase1_chunks:
                raise PlanDoesNotFit(f"out of memory in phase 1 one sample at a time ({message})")
            recovery.floor_chunks(plan.sample_size, chunks)
            return plan.replace(phase1_chunks=chunks, reason=f"out of memory in phase 1: now {chunks} chunks")
        # From the micro-batch that ran out of memory: a capacity between it and the old one would run it again.
        smaller = shrink(plan.micro_batch)
        return recovery.cap(plan.replace(capacity=smaller, reason=f"out of memory at micro_batch={plan.micro_batch}: "
                                                                  f"capacity now {smaller}"))

    def grown(self, plan: Plan) -> Plan:
        return self.for_size(plan, plan.sample_size)


def described(model: MemoryModel, s: int) -> dict[str, Any]:
    """The memory model at sample size ``s``, as a plan describes it."""
    return dict(sample_size=s, memory_model=model.describe(s), fixed_bytes=model.fixed(s),
                per_sample_bytes=model.per_sample(s), measured=tuple(model.points))
