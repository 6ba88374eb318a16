"""Sizing in micro-batches (bn="two_pass", "micro"): the largest micro-batch the memory model fits under the
budget at each sample size, and two_pass's phase 1 in as few chunks as fit.

    sizing = MicroBatchSizing(setting)
    plan = sizing.measure(state, batch)           # the search's trials, then phase 1's
    plan = sizing.for_size(state, plan, s=12288)  # capacity and phase-1 chunks at another sample size
"""
from __future__ import annotations

import math
from typing import Any, Optional

from autobatch.modes import Boundaries
from autobatch.oom import PlanDoesNotFit
from autobatch.plan import Plan
from autobatch.planning.measure import tensor_bytes, warm_optimizer_state
from autobatch.planning.model import MemoryModel
from autobatch.planning.recovery import boundaries_after, host_boundaries
from autobatch.planning.search import search, shrink
from autobatch.planning.sizing import Sizing
from autobatch.planning.state import PlannerState
from autobatch.sizes import format_bytes
from autobatch.split import balanced_splits
from autobatch.stages import Stage
from autobatch.transaction import trial_transaction

__all__ = ["MicroBatchSizing"]

Point = tuple[int, int, int]
#: A plan's precise layout where it does not keep every boundary.
_GROUPED = {"boundaries": Boundaries.GROUPED, "boundary_bytes": 0}


class MicroBatchSizing(Sizing):
    """Micro-batches of the setting's mode, with phase 1 where its strategy runs one."""

    def _has_phase1(self, capacity: int) -> bool:
        return capacity < self.setting.share and self.setting.strategy.needs_phase1()

    # -- the start -------------------------------------------------------------------------------

    def _nothing_fits(self, state: PlannerState, error: str, batch: Any) -> str:
        """Why not even one sample fits, in words: what the memory holds, and the undo copies where one sample's
        step without them fits (measured by one more trial)."""
        g = self.setting
        resident, copies = tensor_bytes(g.micro.model, g.micro.optimizer), g.micro.undo_copy_bytes()
        held = (f"{error}; of it, {format_bytes(resident)} are parameters, gradients, buffers and optimizer state, and "
                f"{format_bytes(copies)} the update's undo copies")
        without = None
        if copies:
            kept, g.micro.update_copies = g.micro.update_copies, "none"
            try:
                without = g.trials.micro_step_peak(batch, 1)
            finally:
                g.micro.update_copies = kept
        if without is not None and without <= state.limit.budget_bytes:
            host = "" if g.micro.device.type == "cpu" else \
                "update_copies='host' (the copies in host memory, a copy to the host per step) or "
            return (f"{held}, without which one sample would fit: pass {host}update_copies='none' (no copies: an "
                    "update that runs out of memory half-way can then not be undone, and the step raises instead of "
                    "being taken again)")
        return f"{held}. Raise memory_budget, free memory on the device, or use a smaller model, input or optimizer state"

    def measure(self, state: PlannerState, batch: Any) -> Plan:
        """The largest micro-batch whose measured step fits, and phase 1 in as few chunks as fit; the memory
        model starts from these measurements."""
        g = self.setting
        with trial_transaction(g.micro.model, g.micro.optimizer):
            warm_optimizer_state(g.micro.optimizer)
            s = g.micro.batches.sample_size(batch)
            stages: dict[int, tuple[int, int]] = {}  # per n: the forward and backward's peak, the update's

            def peak(n: int) -> Optional[int]:
                peaks = g.trials.micro_step_peaks(batch, n)
                if peaks is not None:
                    stages[n] = peaks
                return None if peaks is None else max(peaks)

            try:
                fit = search(peak, state.limit.budget_bytes, g.share)
            except PlanDoesNotFit as error:
                raise PlanDoesNotFit(self._nothing_fits(state, str(error), batch)) from None
            draws, phase1_points = 0, []
            if self._has_phase1(fit.capacity):
                phase1_points = self._fit_phase1(state, batch, s)
                # Phase 1's random draws stay resident through every micro-batch (autobatch.batchnorm.randomness).
                draws = g.strategy.take_draw_bytes()
        state.draws_per_element = draws / s
        state.learn_boundaries(g.strategy.every_boundary_bytes(), g.strategy.whole_segment_bytes(), s)
        over = [n for n, peak in fit.points if peak is None or peak > state.limit.budget_bytes]
        if over:  # a trial that ran out of memory or passed the budget bounds this size from above
            state.failed[s] = min(over)
        state.model = MemoryModel(self._resident_per_element(batch, s, draws),
                              [(n, s, forward_backward + draws) for n, (forward_backward, _) in stages.items()],
                              updates={s: max(update for _, update in stages.values()) + draws})
        state.phase1 = MemoryModel(state.model.resident_per_element, phase1_points, state.model.base) \
            if phase1_points else None
        base = Plan(capacity=fit.capacity, target_batch=g.options.target_batch, source="measured", reason="",
                    device=state.device, budget_bytes=state.limit.budget_bytes, points=fit.points,
                    trials=g.trials.steps, world_size=g.ranks.world_size, bn=g.strategy.split_mode)
        return self.for_size(state, base, s, batch)

    def _resident_per_element(self, batch: Any, s: int, draws: int) -> float:
        """Bytes per sample element of what a step keeps whatever its micro-batch: phase 1's random draws,
        and on a GPU two_pass's whole batch of inputs, moved there once for phase 1."""
        g = self.setting
        resident = draws / s
        if g.strategy.needs_phase1() and g.micro.device.type != "cpu":
            inputs = sum(t.element_size() * t.numel() for t in g.micro.batches.tensors(batch))
            resident += g.share * inputs / g.micro.batches.size(batch) / s
        return resident

    def _fit_phase1(self, state: PlannerState, batch: Any, s: int) -> list[Point]:
        """Phase 1 (no-grad forward of the whole batch) measured in 1, 2, 4... chunks until it fits:
        (samples per chunk, s, peak) of each."""
        g = self.setting
        points, chunks = [], 1
        while True:
            peak = g.trials.peak(g.trials.phase1(batch, chunks), f"phase 1 in {chunks} chunk(s)", batch)
            if peak is not None:
                points.append((math.ceil(g.share / chunks), s, peak))
            if peak is not None and peak <= state.limit.budget_bytes:
                return points
            if chunks >= g.share:
                raise PlanDoesNotFit("phase 1 of two_pass does not fit the memory budget even one sample at a time; "
                                     "use bn='micro', or raise memory_budget")
            chunks = min(g.share, chunks * 2)

    def from_record(self, state: PlannerState, base: Plan, batch: Any, path: str) -> Optional[Plan]:
        if base.bn is not self.setting.strategy.split_mode:
            return None
        return self.for_size(state, base, self.setting.micro.batches.sample_size(batch), batch)

    # -- every batch -----------------------------------------------------------------------------

    def for_batch(self, state: PlannerState, plan: Plan, batch: Any, s: int) -> tuple[Plan, bool]:
        g = self.setting
        plan = state.recovery.capped(self.for_size(state, plan, s, batch))
        measure = g.micro.device.type == "cuda" or not state.model.covers(s) or (
            state.phase1 is not None and plan.capacity < g.share and not state.phase1.covers(s)) or (
            self._segment_backward(plan) and s not in state.model.backwards)
        return plan, measure

    def _segment_backward(self, plan: Plan) -> bool:
        """Whether a step under ``plan`` runs precise's segment backward after its micro-batches."""
        return self.setting.strategy.has_segment_backward and plan.not_precise is None and len(plan.splits) > 1

    def for_size(self, state: PlannerState, plan: Plan, s: int, batch: Any = None) -> Plan:
        """``plan`` for batches of ``s`` elements per sample: the model's largest micro-batch, and phase 1
        in as few chunks as the model says fit (``batch``: to measure phase 1 where the model cannot tell)."""
        g = self.setting
        model = state.model
        capacity = model.largest_under(state.limit.budget_bytes, s, g.share)
        if s in state.failed and capacity >= state.failed[s]:
            capacity = max(1, state.failed[s] - 1)  # never what a trial at this size saw fail
        chunks = 1
        if self._has_phase1(capacity):
            self._learn_phase1(state, batch, s)
            # Phase 1 not measured yet (FSDP2, after the start): chunks no larger than a training micro-batch,
            # whose memory bounds a no-grad forward's, until the step measures it.
            chunks = self._chunks(state, s) if state.phase1 is not None else math.ceil(g.share / capacity)
        bounded = "" if model.covers(s) else " (beyond the measured sizes: a bound until this size is measured)"
        reason = (f"largest micro-batch the memory model predicts under {state.limit.describe()} for samples of {s} "
                  f"elements: {format_bytes(model.per_sample(s))} per sample{bounded}")
        runs = max(balanced_splits(g.share, capacity))
        predicted, not_precise, every = model.predict(runs, s), None, {}
        if g.strategy.has_segment_backward and capacity < g.share:
            # The segment backward holds whole-batch tensors whatever the micro-batch: where it passes the budget
            # no micro-batch makes it fit, and the projected backward runs instead.
            backward = int(model.backward(s))
            if (backward > state.limit.budget_bytes or s in state.recovery.host) and \
                    host_boundaries(g.micro.device, chunks):
                # Its boundaries in pinned host memory instead: the device holds a segment's micro-batch. Where
                # that runs out of memory too, the projected backward (`after_out_of_memory`).
                every = {"boundaries": Boundaries.HOST, "boundary_bytes": 0}
            elif backward > state.limit.budget_bytes:
                not_precise = (f"its segment backward peaks at {format_bytes(backward)} for samples of {s} "
                               f"elements, over the budget of {format_bytes(state.limit.budget_bytes)}")
            else:
                predicted = max(predicted, backward)
                every = self._every_boundary(state, s, predicted) if chunks == 1 else {}
                predicted += every.get("boundary_bytes", 0)
        return plan.replace(capacity=capacity, reason=reason, predicted_peak_bytes=predicted, phase1_chunks=chunks,
                            not_precise=not_precise, **{**_GROUPED, **every}, **described(model, s))

    @staticmethod
    def _every_boundary(state: PlannerState, s: int, predicted: float) -> dict[str, Any]:
        """Precise keeps every boundary (no forward recomputed in its backward) where that fits beside the rest of
        the step's predicted peak, and recomputes whole segments where that fits too: the micro-batch is never made
        smaller for either."""
        extra = int(state.every_boundary_per_element * s)
        if not extra or s in state.recovery.grouped or predicted + extra > state.limit.budget_bytes:
            return {}
        whole = int(state.whole_segment_per_element * s)
        if whole and s not in state.recovery.every and predicted + extra + whole <= state.limit.budget_bytes:
            return {"boundaries": Boundaries.WHOLE_SEGMENTS, "boundary_bytes": extra + whole}
        return {"boundaries": Boundaries.EVERY, "boundary_bytes": extra}

    def _learn_phase1(self, state: PlannerState, batch: Any, s: int) -> None:
        """Phase 1 measured by a trial at the first sample size that splits the batch; at later sizes the
        real steps measure it (beyond the measured sizes a bound decides its chunks until then)."""
        g = self.setting
        if state.phase1 is not None or batch is None or g.micro.collective:
            return
        with trial_transaction(g.micro.model, g.micro.optimizer):
            warm_optimizer_state(g.micro.optimizer)
            points = self._fit_phase1(state, batch, s)
            draws = g.strategy.take_draw_bytes()
        if draws and not state.draws_per_element:
            # Phase 1's draws stay resident through the micro-batches: the model's fixed part grows with s.
            state.draws_per_element = draws / s
            state.model.resident_per_element += draws / s
        state.phase1 = MemoryModel(state.model.resident_per_element, list(points), state.model.base)

    def _chunks(self, state: PlannerState, s: int) -> int:
        """The fewest chunks (1, 2, 4...) whose phase 1 the model predicts under the budget."""
        g = self.setting
        chunks = 1
        while chunks < g.share and state.phase1.predict(math.ceil(g.share / chunks), s) > state.limit.budget_bytes:
            chunks = min(g.share, chunks * 2)
        return chunks

    def learn(self, state: PlannerState, plan: Plan, batch: Any, s: int) -> bool:
        """The micro-batch the model predicts at ``s`` verified by a trial (and the fit corrected, up to three
        times), and phase 1 measured."""
        g = self.setting
        if state.model.covers(s) or g.micro.collective:
            return False
        budget_bytes = state.limit.budget_bytes
        with trial_transaction(g.micro.model, g.micro.optimizer):
            warm_optimizer_state(g.micro.optimizer)
            tried = set()
            for _ in range(3):
                n = state.model.largest_under(budget_bytes, s, g.share)
                if n in tried:
                    break
                tried.add(n)
                peaks = g.trials.micro_step_peaks(batch, n)
                draws = state.draws_per_element * s
                state.model.add(n, s, (peaks[0] if peaks is not None else 2 * budget_bytes) + draws)
                if peaks is not None:
                    state.model.add_update(s, peaks[1] + draws)
        largest = state.model.largest_under(budget_bytes, s, g.share)
        if state.phase1 is not None and not state.phase1.covers(s) and self._has_phase1(largest):
            with trial_transaction(g.micro.model, g.micro.optimizer):
                for point in self._fit_phase1(state, batch, s):
                    state.phase1.add(*point)
        return True

    # -- after running out of memory -------------------------------------------------------------

    def after_out_of_memory(self, state: PlannerState, plan: Plan, stage: Stage, message: str) -> Plan:
        """More phase-1 chunks if phase 1 ran out of memory, else a smaller micro-batch; kept for this sample
        size until ``grow_after`` clean steps."""
        recovery = state.recovery
        smaller = boundaries_after(plan, stage, self.setting.micro.device)
        if smaller is Boundaries.EVERY:  # what recomputing whole segments added goes first
            recovery.every.add(plan.sample_size)
            every = int(state.every_boundary_per_element * plan.sample_size)
            predicted = plan.predicted_peak_bytes
            return plan.replace(boundaries=Boundaries.EVERY, boundary_bytes=every,
                                predicted_peak_bytes=predicted and predicted - plan.boundary_bytes + every,
                                reason=f"out of memory in {stage.value} recomputing whole segments in precise's "
                                       f"backward ({message}): micro-batch by micro-batch for samples of "
                                       f"{plan.sample_size} elements")
        if smaller is Boundaries.GROUPED:  # the plan without what keeping every boundary adds was predicted to fit
            recovery.grouped.add(plan.sample_size)
            predicted = plan.predicted_peak_bytes
            return plan.replace(**_GROUPED, predicted_peak_bytes=predicted and predicted - plan.boundary_bytes,
                                reason=f"out of memory in {stage.value} keeping every boundary of precise's backward "
                                       f"({message}): the grouped ones only for samples of {plan.sample_size} elements")
        if smaller is Boundaries.HOST:
            recovery.host.add(plan.sample_size)
            return plan.replace(boundaries=Boundaries.HOST, reason=f"out of memory in precise's segment backward "
                                                                  f"({message}): its boundaries in host memory for "
                                                                  f"samples of {plan.sample_size} elements")
        if stage is Stage.SEGMENT_BACKWARD:
            # The segment backward holds the whole batch's tensors at its cuts: a smaller micro-batch would not
            # shrink it. The projected backward, which holds none, runs at this sample size instead.
            why = f"its segment backward ran out of memory ({message})"
            recovery.not_precise[plan.sample_size] = why
            return plan.replace(not_precise=why, reason=f"out of memory in precise's segment backward: the projected "
                                                        f"backward for samples of {plan.sample_size} elements")
        if stage is Stage.PHASE1:
            chunks = min(self.setting.share, plan.phase1_chunks * 2)
            if chunks == plan.phase1_chunks:
                raise PlanDoesNotFit(f"out of memory in phase 1 one sample at a time ({message})")
            recovery.floor_chunks(plan.sample_size, chunks)
            return plan.replace(phase1_chunks=chunks, reason=f"out of memory in phase 1: now {chunks} chunks")
        # From the micro-batch that ran out of memory: a capacity between it and the old one would run it again.
        smaller = shrink(plan.micro_batch)
        return recovery.cap(plan.replace(capacity=smaller, reason=f"out of memory at micro_batch={plan.micro_batch}: "
                                                                  f"capacity now {smaller}"))

    def grown(self, state: PlannerState, plan: Plan) -> Plan:
        return self.for_size(state, plan, plan.sample_size)


def described(model: MemoryModel, s: int) -> dict[str, Any]:
    """The memory model at sample size ``s``, as a plan describes it."""
    return dict(sample_size=s, memory_model=model.describe(s), fixed_bytes=model.fixed(s),
                per_sample_bytes=model.per_sample(s), measured=tuple(model.points))
