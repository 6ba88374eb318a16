"""The planner: the one owner of a run's plan. It plans the start (from the cache or with real steps), gives
every logical batch its plan, and learns from how each step went.

    planner = planner_for(micro, strategy, options)    # measured (micro_batch="auto") or the size given
    plan, measure = planner.next(batch)                # this batch's plan (the start's trials the first time)
    redo = planner.went(Ran(plan, largest, meter))     # or RanOutOfMemory(plan, stage, message): redo?
    planner.tune(batch)                                # ab.tune: plan now, or learn another sample size
    saved = planner.state.snapshot()                   # a step's transaction puts it back on error

Everything the planner knows lives in its `PlannerState` (autobatch.planning.state); what depends on the
BatchNorm mode is the mode's `Sizing` (autobatch.planning.sizing), chosen once from ``strategy.pieces``
and handed the state at every call: micro-batches (autobatch.planning.micro_batches), the whole batch,
or auto's choice between them (autobatch.planning.whole).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Union

from autobatch.agreement import agree_on_plan
from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.microstep import MicroStep
from autobatch.modes import Boundaries, Pieces
from autobatch.options import Options
from autobatch.plan import Plan, fixed_plan
from autobatch.planning.cache import PlanCache, plan_key
from autobatch.planning.measure import StepMeter, tensor_bytes
from autobatch.planning.memory import budget, probe
from autobatch.planning.micro_batches import MicroBatchSizing
from autobatch.planning.model import MemoryModel
from autobatch.planning.record import PlanRecord
from autobatch.planning.recovery import boundaries_after
from autobatch.planning.sizing import Sizing
from autobatch.planning.state import PlannerState, Setting
from autobatch.planning.trials import Trials
from autobatch.planning.whole import WholeBatchSizing, WholeOrSplitSizing
from autobatch.sizes import format_bytes
from autobatch.stages import Stage

__all__ = ["FixedPlanner", "Outcome", "Planner", "Ran", "RanOutOfMemory", "planner_for", "sizing_for"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ran:
    """A step that ran under ``plan`` (its largest micro-batch ``largest`` samples); ``meter`` measured it
    where ``measured``."""

    plan: Plan
    largest: int
    meter: StepMeter
    measured: bool = False


@dataclass(frozen=True)
class RanOutOfMemory:
    """A step under ``plan`` that ran out of memory in ``stage``, with the error's first line."""

    plan: Plan
    stage: Stage
    message: str


Outcome = Union[Ran, RanOutOfMemory]


def sizing_for(setting: Setting) -> Sizing:
    """How the run's mode is sized, from how it cuts a logical batch (``strategy.pieces``); decided once."""
    pieces = setting.strategy.pieces
    if pieces is Pieces.WHOLE_BATCH:
        return WholeBatchSizing(setting)
    split = MicroBatchSizing(setting)
    if pieces is Pieces.WHOLE_OR_SPLIT:
        return WholeOrSplitSizing(setting, WholeBatchSizing(setting), split)
    return split


def planner_for(micro: MicroStep, strategy: BatchNormStrategy, options: Options) -> Union["Planner", "FixedPlanner"]:
    """The run's planner: measured for micro_batch="auto", else the size the user gave."""
    if options.auto:
        return Planner(micro, strategy, options)
    return FixedPlanner(micro, strategy, options)


class FixedPlanner:
    """micro_batch=<int>: the plan the user fixed, for every batch; running out of memory is the user's to fix.
    Its one choice is precise's: keeping every boundary where the first precise step, measured, leaves room."""

    def __init__(self, micro: MicroStep, strategy: BatchNormStrategy, options: Options):
        self.micro, self.strategy, self.options = micro, strategy, options
        self.state = PlannerState(plan=fixed_plan(options.target_batch, options.micro_batch,
                                                  micro.ranks.world_size, strategy.split_mode))
        #: Whether a step has been measured to choose precise's boundaries.
        self._chosen = False
        log.info("autobatch plan: micro_batch=%d, splits %s (given), bn=%s (%s)", self.state.plan.micro_batch,
                 self.state.plan.splits, self.state.plan.bn, strategy.gradient_of(self.state.plan))

    def next(self, batch: Any) -> tuple[Plan, bool]:
        plan = self.state.plan
        return plan, not self._chosen and self.strategy.has_segment_backward and len(plan.splits) > 1

    def went(self, outcome: Outcome) -> bool:
        """Never redo a batch (a fixed micro-batch that runs out of memory raises), unless keeping every
        boundary is what ran out: then once more with the grouped ones."""
        plan = self.state.plan
        if isinstance(outcome, RanOutOfMemory):
            smaller = boundaries_after(plan, outcome.stage, self.micro.device)
            if smaller is None:
                return False
            every = self.strategy.every_boundary_bytes() if smaller is Boundaries.EVERY else 0
            self.state.plan = plan.replace(boundaries=smaller, boundary_bytes=every)
            log.info("autobatch: out of memory in %s keeping %s boundaries of precise's backward (%s); %s from now on",
                     outcome.stage.value, plan.boundaries.value, outcome.message, smaller.value)
            return True
        if outcome.measured and not self._chosen:
            self._chosen = True
            self.state.plan = self._boundaries(plan, outcome.meter)
        return False

    def _boundaries(self, plan: Plan, meter: StepMeter) -> Plan:
        """``plan`` keeping every boundary where the measured step's peak and what that adds fit the budget."""
        extra = self.strategy.every_boundary_bytes()
        peaks = [meter.phase1_peak, meter.micro_batches_peak, meter.segment_backward_peak, meter.update_peak]
        peak = max((p for p in peaks if p is not None), default=None)
        if not extra or peak is None:
            return plan
        micro = self.micro
        resident = tensor_bytes(micro.model, micro.optimizer) if micro.device.type == "cpu" else 0
        limit = budget(probe(micro.device, resident_bytes=resident), self.options.memory_budget)
        if peak + extra > limit.budget_bytes:
            return plan
        whole = self.strategy.whole_segment_bytes()
        if whole and peak + extra + whole <= limit.budget_bytes:
            log.info("autobatch: precise keeps every boundary and recomputes whole segments (%s more than grouped), "
                     "within %s", format_bytes(extra + whole), limit.describe())
            return plan.replace(boundaries=Boundaries.WHOLE_SEGMENTS, boundary_bytes=extra + whole)
        log.info("autobatch: precise keeps every boundary (%s more than grouped), within %s",
                 format_bytes(extra), limit.describe())
        return plan.replace(boundaries=Boundaries.EVERY, boundary_bytes=extra)

    def tune(self, batch: Any) -> None:
        """Nothing to measure: the size is the user's."""


class Planner:
    """Chooses the micro-batch of every logical batch of a training run, and adapts it while it trains."""

    def __init__(self, micro: MicroStep, strategy: BatchNormStrategy, options: Options):
        self.setting = Setting(micro, strategy, options, Trials(micro, strategy))
        self.cache = None if options.cache is None else PlanCache(options.cache)
        self.state = PlannerState()
        #: How this run's mode sizes its steps: decided once, from the strategy.
        self.sizing = sizing_for(self.setting)

    # -- the two calls of a step ------------------------------------------------------------------

    def next(self, batch: Any) -> tuple[Plan, bool]:
        """The plan for ``batch``'s sample size (the start's, measured or cached, the first time), and whether
        its step should be measured (a size the model has not measured; on CUDA every step, at no cost)."""
        state = self.state
        if state.plan is None:
            state.plan = self._start(batch)
        planned = self.sizing.for_batch(state, state.plan, batch, self.setting.micro.batches.sample_size(batch))
        if planned is None:  # the plan cannot hold this batch (bn="exact" at a new size): measured again
            planned = self.sizing.measure(state, batch), False
        state.plan = planned[0]
        return planned

    def went(self, outcome: Outcome) -> bool:
        """How the step under ``outcome.plan`` went; whether to redo the same batch (under a smaller plan)."""
        state = self.state
        state.plan = outcome.plan
        if isinstance(outcome, RanOutOfMemory):
            self._after_out_of_memory(outcome.stage, outcome.message)
            return True
        self._learn_boundaries(outcome.plan)
        if outcome.measured:
            self._observe(outcome.largest, outcome.meter)
        if not state.redoing:
            self._after_clean_step()
        state.redoing = False
        return False

    def tune(self, batch: Any) -> None:
        """``ab.tune``: the start now; later, ``batch``'s sample size measured by trials where the model has
        not measured it (a training step measures itself instead). `next` then gives the batch its plan."""
        state = self.state
        if state.plan is None:
            state.plan = self._start(batch)
        elif state.model is not None and self.sizing.learn(state, state.plan, batch,
                                                            self.setting.micro.batches.sample_size(batch)):
            self._store()

    # -- the start -------------------------------------------------------------------------------

    def _start(self, batch: Any) -> Plan:
        """The plan from the cache, else measured with real steps on ``batch``; agreed over ranks."""
        setting, state = self.setting, self.state
        micro = setting.micro
        resident = tensor_bytes(micro.model, micro.optimizer) if micro.device.type == "cpu" else 0
        memory = probe(micro.device, resident_bytes=resident)
        state.limit = budget(memory, setting.options.memory_budget)
        setting.trials.limit_bytes = state.limit.budget_bytes
        state.key = plan_key(micro.model, micro.optimizer, batch, memory.name, memory.total_bytes, micro.batches,
                             world_size=setting.ranks.world_size, **setting.options.keyed())
        record = None if setting.options.refresh_cache or self.cache is None else \
            self.cache.load(state.key, setting.share)
        state.device = f"{memory.device} ({memory.name}, {memory.source})"
        plan = None if record is None else self._cached(record, batch)
        if plan is None:
            plan = self.sizing.measure(state, batch)
            state.plan = plan
            self._store()
        plan = agree_on_plan(setting.ranks, plan)
        state.recovery.clean_steps = 0
        log.info("autobatch plan: micro_batch=%d (capacity %d), splits %s (%s, %d trials), bn=%s (%s)",
                 plan.micro_batch, plan.capacity, plan.splits, plan.source, plan.trials, plan.bn,
                 setting.strategy.gradient_of(plan))
        return plan

    def _cached(self, record: PlanRecord, batch: Any) -> Optional[Plan]:
        """The plan of a cache record for ``batch``; None where this run's mode or modules do not match it,
        or its whole batch's peak passes today's budget."""
        setting, state = self.setting, self.state
        path = self.cache.path(state.key)
        if not record.checkpointing.applies_to(setting.micro.module):
            log.warning("autobatch: the cached plan %s does not match this model; measuring afresh", path)
            return None
        state.model = MemoryModel(record.resident_per_element, list(record.points), updates=dict(record.updates),
                                  backwards=dict(record.backwards))
        state.phase1 = MemoryModel(record.resident_per_element, list(record.phase1_points), record.phase1_base) \
            if record.phase1_points else None
        state.failed = dict(record.failed)
        base = Plan(capacity=setting.share, target_batch=setting.options.target_batch, source="cache",
                    reason=f"memory model from {path}", device=state.device, budget_bytes=state.limit.budget_bytes,
                    world_size=setting.ranks.world_size, bn=record.bn, checkpointing=record.checkpointing)
        return self.sizing.from_record(state, base, batch, str(path))

    # -- what a step taught ----------------------------------------------------------------------

    def _learn_boundaries(self, plan: Plan) -> None:
        """What precise keeping every boundary would add, as the step's phase 1 found it (per sample element)."""
        strategy = self.setting.strategy
        if strategy.every_boundary_bytes() and plan.sample_size:
            self.state.learn_boundaries(strategy.every_boundary_bytes(), strategy.whole_segment_bytes(),
                                        plan.sample_size)

    def _observe(self, n: int, meter: StepMeter) -> None:
        """A real step of micro-batches of at most ``n`` samples at the plan's sample size measured by ``meter``:
        its peaks (phase 1's, the micro-batches', the update's) teach the models that size (a measured peak
        above the prediction corrects them)."""
        state = self.state
        s = state.plan.sample_size
        model = state.model
        micro_peak, phase1_peak, update_peak = meter.micro_batches_peak, meter.phase1_peak, meter.update_peak
        backward_peak = meter.segment_backward_peak
        if state.plan.boundary_bytes:
            # The models hold the grouped layout's memory; the plan adds what keeping every boundary holds.
            micro_peak, phase1_peak, backward_peak = (
                None if peak is None else max(0, peak - state.plan.boundary_bytes)
                for peak in (micro_peak, phase1_peak, backward_peak))
        learned = False
        # Any step measured above its prediction corrects the model (past a hair, so that allocator noise
        # does not rewrite the cache every step): a prediction too low is a step closer to the budget.
        if micro_peak is not None and (not model.covers(s) or
                                       micro_peak > (model.fixed(s) + n * model.per_sample(s)) * 1.01):
            model.add(n, s, micro_peak)
            learned = True
        if update_peak is not None and update_peak > model.update(s) * 1.01:
            model.add_update(s, update_peak)
            learned = True
        if backward_peak is not None and (s not in model.backwards or backward_peak > model.backward(s) * 1.01):
            model.add_backward(s, backward_peak)
            learned = True
        if phase1_peak is not None:
            if state.phase1 is None:
                state.phase1 = MemoryModel(model.resident_per_element, [], model.base)
            n = -(-self.setting.share // state.plan.phase1_chunks)
            if not state.phase1.covers(s) or phase1_peak > state.phase1.predict(n, s):
                state.phase1.add(n, s, phase1_peak)
                learned = True
        if learned:
            log.info("autobatch: measured a step at %d elements per sample; memory model: %s", s, model.describe(s))
            self._store()

    def _store(self) -> None:
        """Keep the memory models and the plan's choices for the next launch."""
        state = self.state
        if self.cache is None or state.model is None:
            return
        plan, phase1 = state.plan, state.phase1
        self.cache.store(state.key, PlanRecord(
            capacity=plan.capacity, points=list(state.model.points),
            resident_per_element=state.model.resident_per_element,
            phase1_points=list(phase1.points) if phase1 is not None else [],
            phase1_base=phase1.base_hint if phase1 is not None else 0.0, phase1_chunks=plan.phase1_chunks,
            budget_bytes=plan.budget_bytes, bn=plan.bn, checkpointing=plan.checkpointing,
            failed=dict(state.failed), updates=dict(state.model.updates), backwards=dict(state.model.backwards)))

    def _after_out_of_memory(self, stage: Stage, message: str) -> None:
        """A smaller plan for the same batch: a ceiling on this sample size's micro-batch (or a floor on its
        phase-1 chunks), not a point of the model, since running out of memory may be passing
        (fragmentation, another process); the steps that follow are measured on CUDA and teach the model
        what a step at this size really holds. Not stored: a transient shortage must not shrink the next launch."""
        state = self.state
        state.recovery.ran_out_of_memory()
        state.redoing = True
        state.plan = self.sizing.after_out_of_memory(state, state.plan, stage, message)
        log.warning("autobatch ran out of memory (%s); %s; redoing the same logical batch", message, state.plan.reason)

    def _after_clean_step(self) -> None:
        """After ``grow_after`` clean steps since running out of memory, the model's micro-batch again."""
        state = self.state
        grow_after = self.setting.options.grow_after
        if state.model is None or not state.recovery.after_clean_step(grow_after):
            return
        grown = self.sizing.grown(state, state.plan)
        if grown.capacity != state.plan.capacity:
            grown = grown.replace(reason=f"grown back to capacity {grown.capacity}, the memory model's, after "
                                         f"{grow_after} clean steps")
            log.info("autobatch: %s", grown.reason)
        state.plan = grown
