"""The plan's life in a training run: measured or cached at the start, shrunk on out-of-memory, grown back.

    tuner = Tuner(micro, strategy, target_batch=16, memory_budget="6GiB")
    plan = tuner.plan_for(batch)                         # real trial steps, or the cache: no trial
    plan = tuner.after_out_of_memory(plan, phase, ...)   # smaller micro-batch, same logical batch again
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Optional, Union

from autobatch.batchnorm.exact import Exact
from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.checkpointing import Checkpointing, candidates as checkpointing_candidates
from autobatch.microstep import MicroStep
from autobatch.phases import Phase
from autobatch.planning.cache import PlanCache, plan_key
from autobatch.planning.measure import peak_bytes, tensor_bytes, warm_optimizer_state
from autobatch.planning.memory import Budget, budget, first_line, format_bytes, is_out_of_memory, probe, release_memory
from autobatch.planning.planner import Candidate, Fit, Phase1, Plan, search, shrink
from autobatch.planning.whole_batch import timed, whole_batch_step
from autobatch.snapshot import preserved

__all__ = ["Tuner"]

log = logging.getLogger(__name__)

#: bn="auto" takes the whole batch with checkpointing where its step takes at most this many times
#: plain accumulation's at the largest micro-batch that fits.
AUTO_SLOWDOWN = 1.5


class Tuner:
    """Chooses the micro-batch of a training run and adapts it while it trains.

    Its trials run real steps through ``micro`` and ``strategy``, the same code that trains, so that
    what is measured is what trains. ``lockstep``: the user asked for phase 1 alongside the first
    micro-batch, planned where it fits.
    """

    def __init__(self, micro: MicroStep, strategy: BatchNormStrategy, target_batch: int,
                 memory_budget: Union[int, float, str, None] = None, cache: Union[bool, str, os.PathLike] = True,
                 retune: bool = False, grow_after: Optional[int] = None, lockstep: bool = False):
        self.micro = micro
        self.strategy = strategy
        self.target_batch = target_batch
        self.ranks = micro.ranks
        #: This rank's share of a logical batch.
        self.share = target_batch // self.ranks.world_size
        self.memory_budget = memory_budget
        self.cache = None if cache is False else PlanCache(None if cache is True else cache)
        self.retune = retune
        self.grow_after = grow_after
        self.lockstep = lockstep
        self._fit: Optional[Fit] = None
        #: Whether phase 1 alongside the first micro-batch was measured to fit the budget.
        self._lockstep_fits = True
        self._fitted_micro_batch = 0
        self._key = ""
        self._clean_steps = 0

    # -- the start -------------------------------------------------------------------------------

    def plan_for(self, batch: Any) -> Plan:
        """The plan from the cache, else measured with real steps on ``batch``; agreed over ranks."""
        micro = self.micro
        resident = tensor_bytes(micro.model, micro.optimizer) if micro.device.type == "cpu" else 0
        memory = probe(micro.device, resident_bytes=resident)
        limit = budget(memory, self.memory_budget)
        self._key = plan_key(
            micro.model, micro.optimizer, batch, memory.name, memory.total_bytes, micro.batches,
            target_batch=self.target_batch,
            bn=self.strategy.name, autocast=micro.autocast_dtype, memory_budget=self.memory_budget,
            world_size=self.ranks.world_size, loss=micro.compute_loss is not None, update_copies=micro.update_copies)
        record = None if self.retune or self.cache is None else self.cache.load(self._key)
        device = f"{memory.device} ({memory.name}, {memory.source})"
        plan = None if record is None else self._cached(record, limit, device)
        if plan is None:
            plan = self._measure(batch, limit, device)
            self._store(plan)
        plan = self._agreed(plan)
        self._fitted_micro_batch = plan.micro_batch
        log.info("autobatch plan: micro_batch=%d, splits %s (%s, %d trials)", plan.micro_batch, plan.splits,
                 plan.source, plan.trials)
        return plan

    def _phase1(self, chunks: int) -> Phase1:
        return Phase1.alongside() if self.lockstep and self._lockstep_fits else Phase1.chunked(chunks)

    def _cached(self, record: dict[str, Any], limit: Budget, device: str) -> Optional[Plan]:
        """The plan of a cache record; None where it names a mode or modules this run does not have."""
        bn = record.get("bn", self.strategy.split_mode)
        policy = Checkpointing(tuple(record.get("checkpointed", [])), record.get("selective", False),
                               record.get("label", "none"))
        if bn not in (self.strategy.split_mode, Exact.name) or not policy.applies_to(self.micro.module):
            log.warning("autobatch: the cached plan %s does not match this model; measuring afresh",
                        self.cache.path(self._key))
            return None
        self._fit = Fit(record["micro_batch"], record["fixed_bytes"], record["per_sample_bytes"],
                        tuple((n, peak) for n, peak in record["points"]))
        whole = bn == Exact.name
        micro_batch = self.share if whole else min(record["micro_batch"],
                                                   self._fit.largest_under(limit.budget_bytes, self.share))
        self._lockstep_fits = record.get("lockstep_fits", False)
        return Plan(micro_batch, self.target_batch, "cache", f"fitted line from {self.cache.path(self._key)}",
                    device, limit.budget_bytes, self._fit.predict(micro_batch), self._fit.points, 0,
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
        with preserved(micro.model, micro.optimizer):
            warm_optimizer_state(micro.optimizer)
            if self.strategy.whole_batch_only or self.strategy.prefers_whole_batch:
                return self._measure_whole(batch, limit, device)
            return self._measure_split(batch, limit, device)

    def _measure_whole(self, batch: Any, limit: Budget, device: str) -> Plan:
        """bn="exact": the fastest checkpointing policy whose whole-batch peak fits. bn="auto": that, if
        it needs no checkpointing or costs at most AUTO_SLOWDOWN x plain accumulation; else two_pass."""
        candidates, fitting = self._whole_batch_candidates(batch, limit.budget_bytes)
        best = min(fitting, key=lambda fit: fit[0]) if fitting else None
        if self.strategy.prefers_whole_batch and (best is None or best[1]):
            split = self._measure_split(batch, limit, device)
            seconds = timed(self._micro_step(batch, split.micro_batch), self.micro.device) * len(split.splits)
            seconds = self._slowest([seconds])[0]
            candidates.append(Candidate(f"{split.bn}, micro_batch {split.micro_batch}", split.predicted_peak_bytes,
                                        seconds, False))
            if best is None or best[0] > AUTO_SLOWDOWN * seconds:
                why = "no checkpointing policy fits" if best is None else (
                    f"the best fitting policy ({best[1].label}) took {best[0] / seconds:.2f}x plain accumulation's "
                    f"time, over {AUTO_SLOWDOWN}x")
                return split.replace(candidates=tuple(candidates), reason=f"{split.reason}; whole batch: {why}")
        if best is None:
            smallest = min((c.peak_bytes for c in candidates if c.peak_bytes is not None), default=None)
            raise MemoryError(
                f"bn='exact' does not fit: the whole batch of {self.share} peaked at "
                f"{format_bytes(smallest) if smallest is not None else 'out of memory'} at best (under every "
                f"checkpointing policy tried) against a budget of {format_bytes(limit.budget_bytes)}; use "
                "bn='two_pass', which splits the batch, or a larger memory_budget")
        seconds, policy, peak = best
        self._fit = Fit(self.share, peak, 0, ((self.share, peak),))
        reason = (f"the whole batch in one piece fits {limit.describe()}" + (
            f" with {len(policy.modules)} modules checkpointed ({policy.label}), the fastest that fits" if policy
            else " without checkpointing"))
        return Plan(self.share, self.target_batch, "measured", reason, device, limit.budget_bytes, peak,
                    self._fit.points, len(candidates), Phase1.whole(), self.ranks.world_size, bn=Exact.name,
                    checkpointing=policy, candidates=tuple(candidates))

    def _whole_batch_candidates(self, batch: Any, budget_bytes: int) -> tuple[list[Candidate], list[tuple]]:
        """Every checkpointing policy's whole-batch peak, and (seconds, policy, peak) of those that fit
        (on every rank, its time the slowest rank's: every rank must checkpoint alike, since recomputed
        BatchNorm layers meet the other ranks in backward); stops at no checkpointing if that fits."""
        policies, candidates = checkpointing_candidates(self.micro.module), []
        for policy in policies:
            work = whole_batch_step(self.micro, self.strategy.layers, batch, self.share, policy)
            try:
                peak = self._peak_or_none(work, f"whole batch, checkpointing {policy.label}", batch)
            except RuntimeError as error:
                if not policy:
                    raise
                # A layer that changes its input or output in place breaks checkpointing at its boundary:
                # that policy is out, the model is not.
                log.info("autobatch trial, whole batch, checkpointing %s: fails (%s)", policy.label, first_line(error))
                candidates.append(Candidate(f"{policy.label} (fails: {first_line(error)[:60]})", None, None, True))
                continue
            # Timed apart: the host's memory tracking slows every operation.
            seconds = timed(work, self.micro.device) if peak is not None and peak <= budget_bytes else None
            candidates.append(Candidate(policy.label, peak, seconds, True))
            if seconds is not None and not policy and not self.ranks.active:
                break
        times = self._slowest([c.seconds for c in candidates])
        fitting = [(seconds, policy, c.peak_bytes) for seconds, policy, c in zip(times, policies, candidates)
                   if seconds is not None]
        return candidates, fitting

    def _slowest(self, seconds: list[Optional[float]]) -> list[Optional[float]]:
        """Per entry, the slowest rank's time; None where any rank has none."""
        table = self.ranks.gather([-1.0 if value is None else value for value in seconds])
        return [None if (column < 0).any() else float(column.max()) for column in table.T]

    def _measure_split(self, batch: Any, limit: Budget, device: str) -> Plan:
        """The largest micro-batch whose measured step fits, and phase 1 in as few chunks as fit."""
        try:
            self._fit = fit = search(lambda n: self.trial_peak(batch, n), limit.budget_bytes, self.share)
        except MemoryError as error:
            resident = tensor_bytes(self.micro.model, self.micro.optimizer)
            raise MemoryError(
                f"{error}; of it, {format_bytes(resident)} are parameters, gradients, buffers and optimizer state, "
                f"and the update's undo copies add up to as much again. Raise memory_budget, free memory on the "
                "device, or use a smaller model, input or optimizer state") from None
        chunks, phase1_points = 1, ()
        self._lockstep_fits = True
        if fit.micro_batch < self.share and self.strategy.needs_statistics_pass():
            chunks, phase1_points = self._fit_statistics_pass(batch, limit.budget_bytes)
            # Phase 1's random draws stay resident through every micro-batch (autobatch.batchnorm.randomness).
            draws = self.strategy.take_draw_bytes()
            if draws:
                fit = dataclasses.replace(fit, fixed_bytes=fit.fixed_bytes + draws)
                fit = self._fit = dataclasses.replace(
                    fit, micro_batch=fit.largest_under(limit.budget_bytes, fit.micro_batch))
            # Alongside the first micro-batch, phase 1's peak adds to that micro-batch's activations.
            self._lockstep_fits = chunks == 1 and (
                phase1_points[0][1] + fit.per_sample_bytes * fit.micro_batch <= limit.budget_bytes)
        reason = (f"largest micro-batch whose measured peak fits {limit.describe()}; "
                  f"{fit.per_sample_bytes / 2**20:.2f} MiB per sample")
        if self.lockstep and not self._lockstep_fits:
            reason += "; phase 1 runs before the micro-batches (alongside the first it would pass the budget)"
        return Plan(fit.micro_batch, self.target_batch, "measured", reason, device, limit.budget_bytes,
                    fit.predict(fit.micro_batch), fit.points, fit.trials + len(phase1_points), self._phase1(chunks),
                    self.ranks.world_size, bn=self.strategy.split_mode)

    def trial_peak(self, batch: Any, n: int) -> Optional[int]:
        """The measured peak of one real training micro-step of ``n`` samples; None if out of memory."""
        return self._peak_or_none(self._micro_step(batch, n), f"micro-batch of {n}", batch)

    def _micro_step(self, batch: Any, n: int) -> Callable[[], None]:
        """One real training micro-step of ``n`` samples and the update. It runs on the module itself:
        trials must not wait on other ranks' collectives."""
        micro = self.micro
        whole_batch_resident = self.strategy.needs_statistics_pass() and n < self.share

        def work() -> None:
            # With two_pass the whole logical batch's inputs stay on the device during phase 2.
            batches = micro.batches
            whole = batches.to(batches.take(batch, self.share), micro.device) if whole_batch_resident else None
            part = batches.take(whole, n) if whole is not None else batches.to(batches.take(batch, n), micro.device)
            micro.backward(micro.loss(part, 0, micro.module).value)
            micro.trial_update()  # the update's copies are part of the peak
            for p in micro.parameters():
                p.grad = None

        return work

    def _fit_statistics_pass(self, batch: Any, budget_bytes: int) -> tuple[int, tuple]:
        """The fewest chunks in which phase 1 (no-grad forward of the whole batch) fits the budget."""
        points = []
        chunks = 1
        while True:
            def work(chunks: int = chunks) -> None:
                batches = self.micro.batches
                self.strategy.trial_statistics_pass(batches.to(batches.take(batch, self.share), self.micro.device),
                                                    chunks)

            peak = self._peak_or_none(work, f"phase 1 in {chunks} chunk(s)", batch)
            points.append((chunks, peak))
            if peak is not None and peak <= budget_bytes:
                return chunks, tuple(points)
            if chunks >= self.share:
                raise MemoryError("phase 1 of two_pass does not fit the memory budget even one sample at a "
                                  "time; use bn='micro', or raise memory_budget")
            chunks = min(self.share, chunks * 2)

    def _peak_or_none(self, work: Callable[[], None], what: str, batch: Any) -> Optional[int]:
        micro = self.micro
        try:
            peak = peak_bytes(work, micro.device, micro.model, micro.optimizer, micro.batches.tensors(batch))
        except BaseException as error:
            if not is_out_of_memory(error):
                raise
            peak = None
        if peak is None:
            release_memory(micro.device)
        log.info("autobatch trial, %s: %s", what, "out of memory" if peak is None else f"peak {format_bytes(peak)}")
        return peak

    def _store(self, plan: Plan) -> None:
        """Keep the plan in use, with the fitted line, for the next launch."""
        if self.cache is None or self._fit is None:
            return
        self.cache.store(self._key, {
            "micro_batch": plan.micro_batch, "fixed_bytes": self._fit.fixed_bytes,
            "per_sample_bytes": self._fit.per_sample_bytes, "points": [list(p) for p in self._fit.points],
            "budget_bytes": plan.budget_bytes, "phase1_chunks": plan.phase1.chunks,
            "lockstep_fits": self._lockstep_fits, "bn": plan.bn, "checkpointed": list(plan.checkpointed),
            "selective": plan.checkpointing.selective, "label": plan.checkpointing.label})

    # -- while training --------------------------------------------------------------------------

    def after_out_of_memory(self, plan: Plan, phase: Phase, message: str) -> Plan:
        """For the same batch: phase 1 before the micro-batches if it failed alongside the first one,
        more phase-1 chunks if it failed in phase 1, else a smaller micro-batch."""
        self._clean_steps = 0
        if plan.bn == Exact.name:
            plan = self._split_after_whole_batch(plan, message)
        elif phase is Phase.LOCKSTEP:
            self._lockstep_fits = False
            plan = plan.replace(phase1=Phase1.whole(), reason="out of memory with phase 1 alongside the first "
                                                              "micro-batch: phase 1 now runs before the micro-batches")
        elif phase is Phase.STATISTICS_PASS:
            chunks = min(self.share, plan.phase1.chunks * 2)
            if chunks == plan.phase1.chunks:
                raise MemoryError(f"out of memory in phase 1 one sample at a time ({message})")
            plan = plan.replace(phase1=Phase1.chunked(chunks), reason=f"out of memory in phase 1: now {chunks} chunks")
        else:
            smaller = shrink(plan.micro_batch)
            plan = plan.replace(micro_batch=smaller,
                                reason=f"out of memory at micro_batch={plan.micro_batch}: shrunk to {smaller}")
        # Not stored: the cache keeps the fitted plan, and a transient shortage must not shrink the next launch.
        log.warning("autobatch ran out of memory (%s); %s; redoing the same logical batch", message, plan.reason)
        return plan

    def _split_after_whole_batch(self, plan: Plan, message: str) -> Plan:
        """bn="auto" goes on in micro-batches; bn="exact" has nothing smaller to run."""
        if self.strategy.whole_batch_only:
            raise MemoryError(f"bn='exact' ran out of memory with the whole batch of {self.share} ({message}) "
                              f"under checkpointing {plan.checkpointing.label}; plan again with a smaller "
                              "memory_budget (and retune=True), or use bn='two_pass'")
        smaller = shrink(plan.micro_batch)
        return plan.replace(bn=self.strategy.split_mode, micro_batch=smaller, checkpointing=Checkpointing(),
                            reason=f"out of memory with the whole batch in one piece: {self.strategy.split_mode} "
                                   f"in micro-batches of {smaller}")

    def after_clean_step(self, plan: Plan) -> Plan:
        """After ``grow_after`` clean steps at a shrunken size, the fitted micro-batch again."""
        if self.grow_after is None or plan.micro_batch >= self._fitted_micro_batch:
            return plan
        self._clean_steps += 1
        if self._clean_steps < self.grow_after:
            return plan
        self._clean_steps = 0
        plan = plan.replace(micro_batch=self._fitted_micro_batch, reason=(
            f"grown back to the fitted micro_batch={self._fitted_micro_batch} after {self.grow_after} clean steps"))
        log.info("autobatch: %s", plan.reason)
        return plan
