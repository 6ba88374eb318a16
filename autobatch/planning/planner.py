"""The planner: a training run's plan, from the cache or measured with real steps, agreed over ranks.

    planner = Planner(micro, strategy, options)
    plan = planner.plan_for(batch)            # the cache, or trial steps: no trace left on the model
    plan = planner.after_out_of_memory(plan, phase, message)     # autobatch.planning.recovery

Trials (autobatch.planning.trials) run the code that trains; the search (autobatch.planning.search)
chooses the micro-batch; bn="exact" and "auto" plan the whole batch (autobatch.planning.whole).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.checkpointing import Checkpointing
from autobatch.microstep import MicroStep
from autobatch.modes import Auto, Mode, TwoPass
from autobatch.options import Options
from autobatch.phases import Phase
from autobatch.plan import Phase1, Plan
from autobatch.planning.cache import PlanCache, plan_key
from autobatch.planning.measure import tensor_bytes, warm_optimizer_state
from autobatch.planning.memory import Budget, budget, probe
from autobatch.planning.recovery import Recovery
from autobatch.planning.search import Fit, search
from autobatch.planning.trials import Trials
from autobatch.planning.whole import whole_batch_plan
from autobatch.sizes import format_bytes
from autobatch.transaction import trial_transaction

__all__ = ["Planner"]

log = logging.getLogger(__name__)


def _lockstep(options: Options) -> bool:
    mode = options.bn.two_pass if isinstance(options.bn, Auto) else options.bn
    return isinstance(mode, TwoPass) and mode.lockstep


class Planner:
    """Chooses the micro-batch of a training run and adapts it while it trains."""

    def __init__(self, micro: MicroStep, strategy: BatchNormStrategy, options: Options):
        self.micro = micro
        self.strategy = strategy
        self.options = options
        self.ranks = micro.ranks
        #: This rank's share of a logical batch.
        self.share = options.target_batch // self.ranks.world_size
        self.trials = Trials(micro, strategy, self.share)
        self.cache = None if options.cache is None else PlanCache(options.cache)
        self.lockstep = _lockstep(options)
        self.recovery = Recovery(self.share, strategy.split_mode, strategy.whole_batch_only, options.grow_after)
        self.fit: Optional[Fit] = None
        self.key = ""

    # -- the start -------------------------------------------------------------------------------

    def plan_for(self, batch: Any) -> Plan:
        """The plan from the cache, else measured with real steps on ``batch``; agreed over ranks."""
        micro = self.micro
        resident = tensor_bytes(micro.model, micro.optimizer) if micro.device.type == "cpu" else 0
        memory = probe(micro.device, resident_bytes=resident)
        limit = budget(memory, self.options.memory_budget)
        self.key = plan_key(micro.model, micro.optimizer, batch, memory.name, memory.total_bytes, micro.batches,
                            world_size=self.ranks.world_size, **self.options.keyed())
        record = None if self.options.refresh_cache or self.cache is None else self.cache.load(self.key, self.share)
        device = f"{memory.device} ({memory.name}, {memory.source})"
        plan = None if record is None else self._cached(record, limit, device)
        if plan is None:
            plan = self._measure(batch, limit, device)
            self._store(plan)
        plan = self._agreed(plan)
        self.recovery.fitted(plan)
        log.info("autobatch plan: micro_batch=%d, splits %s (%s, %d trials)", plan.micro_batch, plan.splits,
                 plan.source, plan.trials)
        return plan

    def _phase1(self, chunks: int) -> Phase1:
        return Phase1.alongside() if self.lockstep and self.recovery.lockstep_fits else Phase1.chunked(chunks)

    def _cached(self, record: dict[str, Any], limit: Budget, device: str) -> Optional[Plan]:
        """The plan of a cache record; None where it names a mode or modules this run does not have, or
        a whole batch whose peak passes today's budget."""
        bn = Mode(record.get("bn", self.strategy.split_mode))
        policy = Checkpointing(tuple(record.get("checkpointed", [])), record.get("selective", False),
                               record.get("label", "none"))
        path = self.cache.path(self.key)
        if bn not in (self.strategy.split_mode, Mode.EXACT) or not policy.applies_to(self.micro.module):
            log.warning("autobatch: the cached plan %s does not match this model; measuring afresh", path)
            return None
        fit = Fit(record["micro_batch"], record["fixed_bytes"], record["per_sample_bytes"],
                  tuple((n, peak) for n, peak in record["points"]))
        whole = bn is Mode.EXACT
        if whole and fit.fixed_bytes > limit.budget_bytes:
            log.warning("autobatch: the cached whole-batch plan %s peaked at %s, over today's budget of %s; measuring "
                        "afresh", path, format_bytes(fit.fixed_bytes), format_bytes(limit.budget_bytes))
            return None
        self.fit = fit
        micro_batch = self.share if whole else min(record["micro_batch"], fit.largest_under(limit.budget_bytes,
                                                                                             self.share))
        self.recovery.lockstep_fits = record.get("lockstep_fits", False)
        return Plan(micro_batch, self.options.target_batch, "cache", f"fitted line from {path}", device,
                    limit.budget_bytes, fit.predict(micro_batch), fit.points, 0,
                    self._phase1(record.get("phase1_chunks", 1)), self.ranks.world_size, bn=bn,
                    checkpointing=policy)

    def _agreed(self, plan: Plan) -> Plan:
        """Every rank runs the same plan: the smallest micro-batch, the most phase-1 chunks, and phase 1
        alongside the first micro-batch only where it fits on every rank."""
        if not self.ranks.active:
            return plan
        table = self.ranks.gather([plan.micro_batch, plan.phase1.chunks, plan.phase1.lockstep])
        micro_batch, chunks, lockstep = int(table[:, 0].min()), int(table[:, 1].max()), bool(table[:, 2].min())
        phase1 = Phase1.alongside() if lockstep else Phase1.chunked(chunks)
        if (micro_batch, phase1) == (plan.micro_batch, plan.phase1):
            return plan
        return plan.replace(micro_batch=micro_batch, phase1=phase1, reason=plan.reason + "; agreed with the other ranks")

    def _measure(self, batch: Any, limit: Budget, device: str) -> Plan:
        micro = self.micro
        with trial_transaction(micro.model, micro.optimizer):
            warm_optimizer_state(micro.optimizer)
            if self.strategy.whole_batch_only or self.strategy.prefers_whole_batch:
                plan, fit = whole_batch_plan(self.trials, self.ranks, batch, limit, device, self.options.target_batch,
                                             self.strategy.prefers_whole_batch,
                                             lambda: self._measure_split(batch, limit, device))
                self.fit = fit or self.fit
                return plan
            return self._measure_split(batch, limit, device)

    def _measure_split(self, batch: Any, limit: Budget, device: str) -> Plan:
        """The largest micro-batch whose measured step fits, and phase 1 in as few chunks as fit."""
        trials = self.trials
        try:
            self.fit = fit = search(lambda n: trials.micro_step_peak(batch, n), limit.budget_bytes, self.share)
        except MemoryError as error:
            resident = tensor_bytes(self.micro.model, self.micro.optimizer)
            raise MemoryError(
                f"{error}; of it, {format_bytes(resident)} are parameters, gradients, buffers and optimizer state, "
                f"and the update's undo copies add up to as much again. Raise memory_budget, free memory on the "
                "device, or use a smaller model, input or optimizer state") from None
        chunks, phase1_points = 1, ()
        self.recovery.lockstep_fits = True
        if fit.micro_batch < self.share and self.strategy.needs_statistics_pass():
            chunks, phase1_points = self._fit_statistics_pass(batch, limit.budget_bytes)
            # Phase 1's random draws stay resident through every micro-batch (autobatch.batchnorm.randomness).
            draws = self.strategy.take_draw_bytes()
            if draws:
                fit = dataclasses.replace(fit, fixed_bytes=fit.fixed_bytes + draws)
                fit = self.fit = dataclasses.replace(
                    fit, micro_batch=fit.largest_under(limit.budget_bytes, fit.micro_batch))
            # Alongside the first micro-batch, phase 1's peak adds to that micro-batch's activations.
            self.recovery.lockstep_fits = chunks == 1 and (
                phase1_points[0][1] + fit.per_sample_bytes * fit.micro_batch <= limit.budget_bytes)
        reason = (f"largest micro-batch whose measured peak fits {limit.describe()}; "
                  f"{fit.per_sample_bytes / 2**20:.2f} MiB per sample")
        if self.lockstep and not self.recovery.lockstep_fits:
            reason += "; phase 1 runs before the micro-batches (alongside the first it would pass the budget)"
        return Plan(fit.micro_batch, self.options.target_batch, "measured", reason, device, limit.budget_bytes,
                    fit.predict(fit.micro_batch), fit.points, fit.trials + len(phase1_points), self._phase1(chunks),
                    self.ranks.world_size, bn=self.strategy.split_mode)

    def _fit_statistics_pass(self, batch: Any, budget_bytes: int) -> tuple[int, tuple]:
        """The fewest chunks in which phase 1 (no-grad forward of the whole batch) fits the budget."""
        points = []
        chunks = 1
        while True:
            peak = self.trials.peak(self.trials.statistics_pass(batch, chunks), f"phase 1 in {chunks} chunk(s)", batch)
            points.append((chunks, peak))
            if peak is not None and peak <= budget_bytes:
                return chunks, tuple(points)
            if chunks >= self.share:
                raise MemoryError("phase 1 of two_pass does not fit the memory budget even one sample at a "
                                  "time; use bn='micro', or raise memory_budget")
            chunks = min(self.share, chunks * 2)

    def _store(self, plan: Plan) -> None:
        """Keep the plan in use, with the fitted line, for the next launch."""
        if self.cache is None or self.fit is None:
            return
        self.cache.store(self.key, {
            "micro_batch": plan.micro_batch, "fixed_bytes": self.fit.fixed_bytes,
            "per_sample_bytes": self.fit.per_sample_bytes, "points": [list(p) for p in self.fit.points],
            "budget_bytes": plan.budget_bytes, "phase1_chunks": plan.phase1.chunks,
            "lockstep_fits": self.recovery.lockstep_fits, "bn": str(plan.bn), "checkpointed": list(plan.checkpointed),
            "selective": plan.checkpointing.selective, "label": plan.checkpointing.label})

    # -- while training --------------------------------------------------------------------------

    def after_out_of_memory(self, plan: Plan, phase: Phase, message: str) -> Plan:
        return self.recovery.after_out_of_memory(plan, phase, message)

    def after_clean_step(self, plan: Plan) -> Plan:
        return self.recovery.after_clean_step(plan)
