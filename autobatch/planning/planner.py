"""The planner: a training run's plan, from the cache or measured with real steps, and a micro-batch
for every logical batch from a memory model of what was measured.

    planner = Planner(micro, strategy, options)
    plan = planner.plan_for(batch)             # the start: the cache, or trial steps (no trace left)
    plan, measure = planner.for_batch(plan, batch)    # each batch: its sample size's plan
    planner.observe(plan, n, meter)            # a real step measured: the model learns its size
    planner.learn(plan, other_batch)           # or trials, now (ab.tune)
    plan = planner.after_out_of_memory(plan, stage, message)

What depends on the BatchNorm mode is the mode's own sizing, which the strategy names once
(``strategy.sizing``): micro-batches (autobatch.planning.micro_batches), the whole batch in one piece,
or auto's choice between them (autobatch.planning.whole). The planner holds what they share: the
budget, the memory models, the trials, the cache and the recovery after running out of memory.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from autobatch.agreement import agree_on_plan
from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.microstep import MicroStep
from autobatch.options import Options
from autobatch.plan import Plan
from autobatch.planning.cache import PlanCache, plan_key
from autobatch.planning.measure import StepMeter, tensor_bytes
from autobatch.planning.memory import Budget, budget, probe
from autobatch.planning.micro_batches import MicroBatchSizing
from autobatch.planning.model import MemoryModel
from autobatch.planning.record import PlanRecord
from autobatch.planning.recovery import Recovery
from autobatch.planning.sizing import Sizing
from autobatch.planning.trials import Trials
from autobatch.planning.whole import WholeBatchSizing, WholeOrSplitSizing
from autobatch.stages import Stage

__all__ = ["Planner"]

log = logging.getLogger(__name__)


class _Kinds:
    """The sizings a strategy chooses from (``BatchNormStrategy.sizing``), bound to one planner."""

    def __init__(self, planner: "Planner"):
        self._planner = planner

    def micro_batches(self, strategy: BatchNormStrategy) -> Sizing:
        return MicroBatchSizing(self._planner, strategy)

    def whole_batch(self) -> Sizing:
        return WholeBatchSizing(self._planner)

    def whole_or_split(self, split: Sizing) -> Sizing:
        return WholeOrSplitSizing(self._planner, WholeBatchSizing(self._planner, prefers_split=True), split)


class Planner:
    """Chooses the micro-batch of every logical batch of a training run, and adapts it while it trains."""

    def __init__(self, micro: MicroStep, strategy: BatchNormStrategy, options: Options):
        self.micro = micro
        self.strategy = strategy
        self.options = options
        self.ranks = micro.ranks
        #: This rank's share of a logical batch.
        self.share = options.target_batch // self.ranks.world_size
        self.trials = Trials(micro, strategy, self.share)
        self.cache = None if options.cache is None else PlanCache(options.cache)
        self.recovery = Recovery(self.share, options.grow_after)
        #: The memory of a step: of its micro-batches (n samples), or of the whole batch under bn="exact".
        self.model: Optional[MemoryModel] = None
        #: two_pass's phase 1: n is the samples of one chunk.
        self.phase1: Optional[MemoryModel] = None
        self.limit: Optional[Budget] = None
        #: Per sample size, the smallest micro-batch whose trial ran out of memory or passed the budget.
        self.failed: dict[int, int] = {}
        #: Bytes of phase 1's recorded draws per sample element: resident in a real step, not in a trial.
        self.draws_per_element = 0.0
        self.device = ""
        self.key = ""
        #: How this run's mode sizes its steps: decided once, by the strategy.
        self.sizing: Sizing = strategy.sizing(_Kinds(self))

    # -- the start -------------------------------------------------------------------------------

    def plan_for(self, batch: Any) -> Plan:
        """The plan from the cache, else measured with real steps on ``batch``; agreed over ranks."""
        micro = self.micro
        resident = tensor_bytes(micro.model, micro.optimizer) if micro.device.type == "cpu" else 0
        memory = probe(micro.device, resident_bytes=resident)
        self.limit = budget(memory, self.options.memory_budget)
        self.trials.limit_bytes = self.limit.budget_bytes
        self.key = plan_key(micro.model, micro.optimizer, batch, memory.name, memory.total_bytes, micro.batches,
                            world_size=self.ranks.world_size, **self.options.keyed())
        record = None if self.options.refresh_cache or self.cache is None else self.cache.load(self.key, self.share)
        self.device = f"{memory.device} ({memory.name}, {memory.source})"
        plan = None if record is None else self._cached(record, batch)
        if plan is None:
            plan = self.sizing.measure(batch)
            self.store(plan)
        plan = agree_on_plan(self.ranks, plan)
        self.recovery.clean_steps = 0
        log.info("autobatch plan: micro_batch=%d (capacity %d), splits %s (%s, %d trials), bn=%s (%s)",
                 plan.micro_batch, plan.capacity, plan.splits, plan.source, plan.trials, plan.bn,
                 self.strategy.gradient_of(plan))
        return plan

    def _cached(self, record: PlanRecord, batch: Any) -> Optional[Plan]:
        """The plan of a cache record for ``batch``; None where this run's mode or modules do not match it,
        or its whole batch's peak passes today's budget."""
        path = self.cache.path(self.key)
        if not record.checkpointing.applies_to(self.micro.module):
            log.warning("autobatch: the cached plan %s does not match this model; measuring afresh", path)
            return None
        self.model = MemoryModel(record.resident_per_element, list(record.points), updates=dict(record.updates))
        self.phase1 = MemoryModel(record.resident_per_element, list(record.phase1_points), record.phase1_base) \
            if record.phase1_points else None
        self.failed = dict(record.failed)
        base = Plan(self.share, self.options.target_batch, "cache", f"memory model from {path}", self.device,
                    self.limit.budget_bytes, world_size=self.ranks.world_size, bn=record.bn,
                    checkpointing=record.checkpointing)
        return self.sizing.from_record(base, batch, str(path))

    def remeasure(self, batch: Any) -> Plan:
        """The start's measurement again, for a batch the plan no longer fits (bn="exact" at a new size)."""
        return self.sizing.measure(batch)

    # -- every batch -----------------------------------------------------------------------------

    def for_batch(self, plan: Plan, batch: Any) -> tuple[Plan, bool]:
        """The plan for ``batch``'s sample size, and whether its step should be measured (a size the
        model has not measured; on CUDA every step, at no cost)."""
        return self.sizing.for_batch(plan, batch, self.micro.batches.sample_size(batch))

    def learn(self, plan: Plan, batch: Any) -> None:
        """``batch``'s sample size measured now, by trials, where the model has not measured it (``ab.tune``;
        a training step measures itself instead)."""
        if self.model is not None and self.sizing.learn(plan, batch, self.micro.batches.sample_size(batch)):
            self.store(plan)

    def observe(self, plan: Plan, n: int, meter: StepMeter) -> None:
        """A real step of micro-batches of at most ``n`` samples at ``plan.sample_size`` measured by ``meter``:
        its peaks (phase 1's, the micro-batches', the update's) teach the models that size (a measured peak
        above the prediction corrects them)."""
        s = plan.sample_size
        micro_peak, phase1_peak, update_peak = meter.micro_batches_peak, meter.phase1_peak, meter.update_peak
        learned = False
        # Any step measured above its prediction corrects the model (past a hair, so that allocator noise
        # does not rewrite the cache every step): a prediction too low is a step closer to the budget.
        if micro_peak is not None and (not self.model.covers(s) or
                                       micro_peak > (self.model.fixed(s) + n * self.model.per_sample(s)) * 1.01):
            self.model.add(n, s, micro_peak)
            learned = True
        if update_peak is not None and update_peak > self.model.update(s) * 1.01:
            self.model.add_update(s, update_peak)
            learned = True
        if phase1_peak is not None:
            if self.phase1 is None:
                self.phase1 = MemoryModel(self.model.resident_per_element, [], self.model.base)
            n = -(-self.share // plan.phase1_chunks)
            if not self.phase1.covers(s) or phase1_peak > self.phase1.predict(n, s):
                self.phase1.add(n, s, phase1_peak)
                learned = True
        if learned:
            log.info("autobatch: measured a step at %d elements per sample; memory model: %s", s, self.model.describe(s))
            self.store(plan)

    def store(self, plan: Plan) -> None:
        """Keep the memory models and the plan's choices for the next launch."""
        if self.cache is None or self.model is None:
            return
        self.cache.store(self.key, PlanRecord(
            plan.capacity, list(self.model.points), self.model.resident_per_element,
            list(self.phase1.points) if self.phase1 is not None else [],
            self.phase1.base_hint if self.phase1 is not None else 0.0, plan.phase1_chunks, plan.budget_bytes,
            plan.bn, plan.checkpointing, dict(self.failed), dict(self.model.updates)))

    # -- while training --------------------------------------------------------------------------

    def after_out_of_memory(self, plan: Plan, stage: Stage, message: str) -> Plan:
        """A smaller plan for the same batch: a ceiling on this sample size's micro-batch (or a floor on its
        phase-1 chunks), not a point of the model, since running out of memory may be passing
        (fragmentation, another process); the steps that follow are measured on CUDA and teach the model
        what a step at this size really holds. Not stored: a transient shortage must not shrink the next launch."""
        self.recovery.clean_steps = 0
        plan = self.sizing.after_out_of_memory(plan, stage, message)
        log.warning("autobatch ran out of memory (%s); %s; redoing the same logical batch", message, plan.reason)
        return plan

    def after_clean_step(self, plan: Plan) -> Plan:
        """After ``grow_after`` clean steps since running out of memory, the model's micro-batch again."""
        if self.model is None or not self.recovery.after_clean_step():
            return plan
        grown = self.sizing.grown(plan)
        if grown.capacity != plan.capacity:
            grown = grown.replace(reason=f"grown back to capacity {grown.capacity}, the memory model's, after "
                                         f"{self.recovery.grow_after} clean steps")
            log.info("autobatch: %s", grown.reason)
        return grown
