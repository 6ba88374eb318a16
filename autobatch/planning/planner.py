"""The planner: a training run's plan, from the cache or measured with real steps, agreed over ranks,
and a micro-batch for every logical batch from a memory model of what was measured.

    planner = Planner(micro, strategy, options)
    plan = planner.plan_for(batch)             # the start: the cache, or trial steps (no trace left)
    plan, measure = planner.for_batch(plan, batch)    # each batch: its sample size's micro-batch
    planner.observe(plan, n, micro_peak, phase1_peak) # a real step measured: the model learns its size
    planner.learn(plan, other_batch)           # or trials, now (ab.tune)
    plan = planner.after_out_of_memory(plan, phase, message, batch)     # autobatch.planning.recovery

Trials (autobatch.planning.trials) run the code that trains; the search (autobatch.planning.search)
chooses the first micro-batch; the memory model (autobatch.planning.model) follows the samples'
size from then on; bn="exact" and "auto" plan the whole batch (autobatch.planning.whole).
"""
from __future__ import annotations

import logging
import math
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
from autobatch.planning.model import MemoryModel
from autobatch.planning.recovery import Recovery
from autobatch.planning.search import search
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
        self.lockstep = _lockstep(options)
        self.recovery = Recovery(self.share, strategy.split_mode, strategy.whole_batch_only, options.grow_after)
        #: The memory of a step: of its micro-batches (n samples), or of the whole batch under bn="exact".
        self.model: Optional[MemoryModel] = None
        #: two_pass's phase 1: n is the samples of one chunk.
        self.phase1: Optional[MemoryModel] = None
        self.limit: Optional[Budget] = None
        #: A fully_shard model's trials are collectives: after the start, only steps every rank takes measure.
        self.collective = micro.fsdp is not None and self.ranks.active
        #: Per sample size, the smallest micro-batch whose trial ran out of memory or passed the budget.
        self.failed: dict[int, int] = {}
        #: Bytes of phase 1's recorded draws per sample element: resident in a real step, not in a trial.
        self.draws_per_element = 0.0
        self.device = ""
        self.key = ""

    # -- the start -------------------------------------------------------------------------------

    def plan_for(self, batch: Any) -> Plan:
        """The plan from the cache, else measured with real steps on ``batch``; agreed over ranks."""
        micro = self.micro
        resident = tensor_bytes(micro.model, micro.optimizer) if micro.device.type == "cpu" else 0
        memory = probe(micro.device, resident_bytes=resident)
        self.limit = budget(memory, self.options.memory_budget)
        self.key = plan_key(micro.model, micro.optimizer, batch, memory.name, memory.total_bytes, micro.batches,
                            world_size=self.ranks.world_size, **self.options.keyed())
        record = None if self.options.refresh_cache or self.cache is None else self.cache.load(self.key, self.share)
        self.device = f"{memory.device} ({memory.name}, {memory.source})"
        plan = None if record is None else self._cached(record, batch)
        if plan is None:
            plan = self._measure(batch)
            self._store(plan)
        plan = self._agreed(plan)
        self.recovery.fitted(plan)
        log.info("autobatch plan: micro_batch=%d, splits %s (%s, %d trials)", plan.micro_batch, plan.splits,
                 plan.source, plan.trials)
        return plan

    def _cached(self, record: dict[str, Any], batch: Any) -> Optional[Plan]:
        """The plan of a cache record for ``batch``; None where it names a mode or modules this run does not
        have, or a whole batch whose peak passes today's budget."""
        bn = Mode(record.get("bn", self.strategy.split_mode))
        policy = Checkpointing(tuple(record.get("checkpointed", [])), record.get("selective", False),
                               record.get("label", "none"))
        path = self.cache.path(self.key)
        if bn not in (self.strategy.split_mode, Mode.EXACT) or not policy.applies_to(self.micro.module):
            log.warning("autobatch: the cached plan %s does not match this model; measuring afresh", path)
            return None
        self.model = MemoryModel(record.get("resident_per_element", 0.0),
                                 [tuple(point) for point in record["points"]])
        phase1 = record.get("phase1_points", [])
        self.phase1 = MemoryModel(self.model.resident_per_element, [tuple(p) for p in phase1],
                                  record.get("phase1_base", 0.0)) if phase1 else None
        self.recovery.lockstep_fits = record.get("lockstep_fits", False)
        self.failed = {size: n for size, n in record.get("failed", [])}
        s = self.micro.batches.sample_size(batch)
        if bn is Mode.EXACT and self.model.predict(self.share, s) > self.limit.budget_bytes:
            log.warning("autobatch: the cached whole-batch plan %s peaked at %s, over today's budget of %s; measuring "
                        "afresh", path, format_bytes(self.model.predict(self.share, s)),
                        format_bytes(self.limit.budget_bytes))
            return None
        base = Plan(self.share, self.options.target_batch, "cache", f"memory model from {path}", self.device,
                    self.limit.budget_bytes, world_size=self.ranks.world_size, bn=bn, checkpointing=policy)
        return self._for_size(base, s, batch)

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

    def _measure(self, batch: Any) -> Plan:
        micro = self.micro
        with trial_transaction(micro.model, micro.optimizer):
            warm_optimizer_state(micro.optimizer)
            if self.strategy.whole_batch_only or self.strategy.prefers_whole_batch:
                plan, fit = whole_batch_plan(self.trials, self.ranks, batch, self.limit, self.device,
                                             self.options.target_batch, self.strategy.prefers_whole_batch,
                                             lambda: self._measure_split(batch))
                if fit is None:
                    return plan
                s = self.micro.batches.sample_size(batch)
                self.model, self.phase1 = MemoryModel(0.0, [(self.share, s, fit.fixed_bytes)]), None
                return self._for_size(plan, s, batch)
            return self._measure_split(batch)

    def _measure_split(self, batch: Any) -> Plan:
        """The largest micro-batch whose measured step fits, and phase 1 in as few chunks as fit; the memory
        model starts from these measurements."""
        trials, limit = self.trials, self.limit
        s = self.micro.batches.sample_size(batch)
        try:
            fit = search(lambda n: trials.micro_step_peak(batch, n), limit.budget_bytes, self.share)
        except MemoryError as error:
            resident = tensor_bytes(self.micro.model, self.micro.optimizer)
            raise MemoryError(
                f"{error}; of it, {format_bytes(resident)} are parameters, gradients, buffers and optimizer state, "
                f"and the update's undo copies add up to as much again. Raise memory_budget, free memory on the "
                "device, or use a smaller model, input or optimizer state") from None
        draws, phase1_points = 0, []
        if fit.micro_batch < self.share and self.strategy.needs_statistics_pass():
            phase1_points = self._fit_statistics_pass(batch, s)
            # Phase 1's random draws stay resident through every micro-batch (autobatch.batchnorm.randomness).
            draws = self.strategy.take_draw_bytes()
        self.draws_per_element = draws / s
        over = [n for n, peak in fit.points if peak is None or peak > limit.budget_bytes]
        if over:  # a trial that ran out of memory or passed the budget bounds this size from above
            self.failed[s] = min(over)
        self.model = MemoryModel(self._resident_per_element(batch, s, draws),
                                 [(n, s, peak + draws) for n, peak in fit.points if peak is not None])
        self.phase1 = MemoryModel(self.model.resident_per_element, phase1_points, self.model.base) \
            if phase1_points else None
        base = Plan(fit.micro_batch, self.options.target_batch, "measured", "", self.device, limit.budget_bytes,
                    points=fit.points, trials=self.trials.steps, world_size=self.ranks.world_size,
                    bn=self.strategy.split_mode)
        return self._for_size(base, s, batch)

    def _resident_per_element(self, batch: Any, s: int, draws: int) -> float:
        """Bytes per sample element of what a step keeps whatever its micro-batch: phase 1's random draws,
        and on a GPU two_pass's whole batch of inputs, moved there once for phase 1."""
        resident = draws / s
        if self.strategy.needs_statistics_pass() and self.micro.device.type != "cpu":
            inputs = sum(t.element_size() * t.numel() for t in self.micro.batches.tensors(batch))
            resident += self.share * inputs / self.micro.batches.size(batch) / s
        return resident

    def _fit_statistics_pass(self, batch: Any, s: int) -> list[tuple[int, int, int]]:
        """Phase 1 (no-grad forward of the whole batch) measured in 1, 2, 4... chunks until it fits:
        (samples per chunk, s, peak) of each."""
        points, chunks = [], 1
        while True:
            peak = self.trials.peak(self.trials.statistics_pass(batch, chunks), f"phase 1 in {chunks} chunk(s)", batch)
            if peak is not None:
                points.append((math.ceil(self.share / chunks), s, peak))
            if peak is not None and peak <= self.limit.budget_bytes:
                return points
            if chunks >= self.share:
                raise MemoryError("phase 1 of two_pass does not fit the memory budget even one sample at a "
                                  "time; use bn='micro', or raise memory_budget")
            chunks = min(self.share, chunks * 2)

    # -- every batch -----------------------------------------------------------------------------

    def for_batch(self, plan: Plan, batch: Any) -> tuple[Plan, bool]:
        """The plan for ``batch``'s sample size, and whether its step should be measured (a size the
        model has not measured; on CUDA every step, at no cost)."""
        s = self.micro.batches.sample_size(batch)
        if plan.bn is Mode.EXACT:
            return self._whole_for(plan, batch, s), False
        measure = self.micro.device.type == "cuda" or not self.model.covers(s) or (
            self.phase1 is not None and plan.micro_batch < self.share and not self.phase1.covers(s))
        return self.recovery.capped(self._for_size(plan, s, batch)), measure

    def _for_size(self, plan: Plan, s: int, batch: Any = None) -> Plan:
        """``plan`` for batches of ``s`` elements per sample: the model's largest micro-batch, and phase 1
        in as few chunks as the model says fit (``batch``: to measure phase 1 where the model cannot tell)."""
        limit, model = self.limit.budget_bytes, self.model
        described = dict(sample_size=s, memory_model=model.describe(), fixed_bytes=model.fixed(s),
                         per_sample_bytes=model.per_sample(s), measured=tuple(model.points))
        if plan.bn is Mode.EXACT:
            return plan.replace(predicted_peak_bytes=model.predict(self.share, s), **described)
        micro_batch = model.largest_under(limit, s, self.share)
        if s in self.failed and micro_batch >= self.failed[s]:
            micro_batch = max(1, self.failed[s] - 1)  # never what a trial at this size saw fail
        chunks, lockstep = 1, False
        if micro_batch < self.share and self.strategy.needs_statistics_pass():
            self._learn_statistics_pass(batch, s)
            if self.phase1 is not None:
                chunks = self._chunks(s)
                # Alongside the first micro-batch, phase 1's peak adds to that micro-batch's activations.
                lockstep = self.lockstep and self.recovery.lockstep_fits and chunks == 1 and (
                    self.phase1.predict(self.share, s) + model.per_sample(s) * micro_batch <= limit)
            else:
                # Phase 1 not measured yet (FSDP2, after the start): chunks no larger than a training
                # micro-batch, whose memory bounds a no-grad forward's, until the step measures it.
                chunks = math.ceil(self.share / micro_batch)
        bounded = "" if model.covers(s) else " (beyond the measured sizes: a bound until this size is measured)"
        reason = (f"largest micro-batch the memory model predicts under {self.limit.describe()} for samples of {s} "
                  f"elements: {format_bytes(model.per_sample(s))} per sample{bounded}")
        if self.lockstep and not lockstep and chunks == 1:
            reason += "; phase 1 runs before the micro-batches (alongside the first it would pass the budget)"
        return plan.replace(micro_batch=micro_batch, reason=reason, predicted_peak_bytes=model.predict(micro_batch, s),
                            phase1=Phase1.alongside() if lockstep else Phase1.chunked(chunks), **described)

    def _learn_statistics_pass(self, batch: Any, s: int) -> None:
        """Phase 1 measured by a trial at the first sample size that splits the batch; at later sizes the
        real steps measure it (beyond the measured sizes a bound decides its chunks until then)."""
        if self.phase1 is not None or batch is None or self.collective:
            return
        with trial_transaction(self.micro.model, self.micro.optimizer):
            warm_optimizer_state(self.micro.optimizer)
            points = self._fit_statistics_pass(batch, s)
            draws = self.strategy.take_draw_bytes()
        if draws and not self.draws_per_element:
            # Phase 1's draws stay resident through the micro-batches: the model's fixed part grows with s.
            self.draws_per_element = draws / s
            self.model.resident_per_element += draws / s
        if self.phase1 is None:
            self.phase1 = MemoryModel(self.model.resident_per_element, [], self.model.base)
        for point in points:
            self.phase1.add(*point)

    def _chunks(self, s: int) -> int:
        """The fewest chunks (1, 2, 4...) whose phase 1 the model predicts under the budget."""
        chunks = 1
        while chunks < self.share and self.phase1.predict(math.ceil(self.share / chunks), s) > self.limit.budget_bytes:
            chunks = min(self.share, chunks * 2)
        return chunks

    def _whole_for(self, plan: Plan, batch: Any, s: int) -> Plan:
        """bn="exact" at a new sample size: verified once with a trial of the whole batch under the plan's
        checkpointing; planned afresh there if it would not fit."""
        if s == plan.sample_size:
            return plan
        if not self.model.covers(s) and self.collective:
            if self.model.predict(self.share, s) <= self.limit.budget_bytes:
                return self._for_size(plan, s)  # the bound fits; the step measures
            raise MemoryError(f"bn='exact' with a fully_shard model: the whole batch at {s} elements per sample may "
                              "not fit under its checkpointing, and FSDP2's trials must run on every rank at once; "
                              "tune on the largest batch first (ab.tune on every rank), or use bn='two_pass'")
        if not self.model.covers(s):
            with trial_transaction(self.micro.model, self.micro.optimizer):
                warm_optimizer_state(self.micro.optimizer)
                work = self.trials.whole_batch_step(batch, plan.checkpointing)
                peak = self.trials.peak(work, f"whole batch at {s} elements per sample", batch)
            self.model.add(self.share, s, peak if peak is not None else 2 * self.limit.budget_bytes)
        if self.model.predict(self.share, s) <= self.limit.budget_bytes:
            return self._for_size(plan, s)
        log.info("autobatch: the whole batch at %d elements per sample passes the budget under %s; planning afresh",
                 s, plan.checkpointing.label)
        return self._measure(batch)

    def learn(self, plan: Plan, batch: Any) -> None:
        """``batch``'s sample size measured now, by trials, where the model has not measured it: the
        micro-batch the model predicts is verified (and the fit corrected, up to three times), and phase 1
        measured. ``ab.tune`` does this; a training step measures itself instead."""
        s = self.micro.batches.sample_size(batch)
        if self.model is None or self.strategy.whole_batch_only or self.model.covers(s) or self.collective:
            return
        with trial_transaction(self.micro.model, self.micro.optimizer):
            warm_optimizer_state(self.micro.optimizer)
            tried = set()
            for _ in range(3):
                n = self.model.largest_under(self.limit.budget_bytes, s, self.share)
                if n in tried:
                    break
                tried.add(n)
                peak = self.trials.micro_step_peak(batch, n)
                self.model.add(n, s, (peak if peak is not None else 2 * self.limit.budget_bytes)
                               + self.draws_per_element * s)
        if self.phase1 is not None and not self.phase1.covers(s) and \
                self.model.largest_under(self.limit.budget_bytes, s, self.share) < self.share:
            with trial_transaction(self.micro.model, self.micro.optimizer):
                for point in self._fit_statistics_pass(batch, s):
                    self.phase1.add(*point)
        self._store(plan)

    def observe(self, plan: Plan, n: int, micro_peak: Optional[int], phase1_peak: Optional[int]) -> None:
        """A real step of micro-batches of at most ``n`` samples at ``plan.sample_size`` measured: its
        peaks teach the model that size (a measured peak above the prediction corrects it)."""
        s = plan.sample_size
        learned = False
        # Any step measured above its prediction corrects the model (past a hair, so that allocator noise
        # does not rewrite the cache every step): a prediction too low is a step closer to the budget.
        if micro_peak is not None and (not self.model.covers(s) or micro_peak > plan.predicted_peak_bytes * 1.01):
            self.model.add(n, s, micro_peak)
            learned = True
        if phase1_peak is not None and self.phase1 is None:
            self.phase1 = MemoryModel(self.model.resident_per_element, [], self.model.base)
        if phase1_peak is not None and self.phase1 is not None and not plan.phase1.lockstep and (
                not self.phase1.covers(s) or phase1_peak > self.phase1.predict(math.ceil(self.share / plan.phase1.chunks), s)):
            self.phase1.add(math.ceil(self.share / plan.phase1.chunks), s, phase1_peak)
            learned = True
        if learned:
            log.info("autobatch: measured a step at %d elements per sample; memory model: %s", s, self.model.describe())
            self._store(plan)

    def _store(self, plan: Plan) -> None:
        """Keep the memory model and the plan's choices for the next launch."""
        if self.cache is None or self.model is None:
            return
        self.cache.store(self.key, {
            "micro_batch": plan.micro_batch, "resident_per_element": self.model.resident_per_element,
            "points": [list(p) for p in self.model.points],
            "phase1_points": [list(p) for p in self.phase1.points] if self.phase1 is not None else [],
            "phase1_base": self.phase1.base_hint if self.phase1 is not None else 0.0,
            "budget_bytes": plan.budget_bytes, "phase1_chunks": plan.phase1.chunks,
            "lockstep_fits": self.recovery.lockstep_fits, "bn": str(plan.bn), "checkpointed": list(plan.checkpointed),
            "selective": plan.checkpointing.selective, "label": plan.checkpointing.label,
            "failed": [[size, n] for size, n in sorted(self.failed.items())]})

    # -- while training --------------------------------------------------------------------------

    def after_out_of_memory(self, plan: Plan, phase: Phase, message: str) -> Plan:
        """A smaller plan for the same batch (autobatch.planning.recovery): a ceiling on this sample size's
        micro-batch (or a floor on its phase-1 chunks), not a point of the model, since running out of
        memory may be passing (fragmentation, another process); the steps that follow are measured on CUDA
        and teach the model what a step at this size really holds."""
        return self.recovery.after_out_of_memory(plan, phase, message)

    def after_clean_step(self, plan: Plan) -> Plan:
        """After ``grow_after`` clean steps since running out of memory, the model's micro-batch again."""
        if not self.recovery.after_clean_step() or plan.bn is Mode.EXACT or self.model is None:
            return plan
        grown = self._for_size(plan, plan.sample_size)
        grown = grown.replace(reason=f"grown back to micro_batch={grown.micro_batch}, the memory model's, after "
                                     f"{self.recovery.grow_after} clean steps")
        log.info("autobatch: %s", grown.reason)
        return grown
