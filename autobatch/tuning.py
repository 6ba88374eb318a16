"""The plan's life in a training run: measured or cached at the start, shrunk on out-of-memory, grown back.

    tuner = Tuner(ab, memory_budget="6GiB", cache=True, retune=False, grow_after=None)
    ab.plan = tuner.plan_for(batch)                      # real trial steps, or the cache: no trial
    ab.plan = tuner.after_out_of_memory(ab.plan, ...)    # smaller micro-batch, same logical batch again
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch

from autobatch.batchnorm import BatchNormState, TwoPassBatchNorm
from autobatch.cache import PlanCache, plan_key
from autobatch.measure import peak_bytes, tensor_bytes, warm_optimizer_state
from autobatch.memory import Budget, budget, format_bytes, is_out_of_memory, probe, release_memory
from autobatch.planner import Fit, Plan, search, shrink
from autobatch.snapshot import preserved, undone_on_error
from autobatch.split import take, to_device

if TYPE_CHECKING:
    from autobatch.step import AutoBatch

__all__ = ["Tuner"]

log = logging.getLogger(__name__)


class Tuner:
    """Chooses the micro-batch of an :class:`AutoBatch` and adapts it while it trains.

    It runs trial steps through the AutoBatch's own micro-step code (its private methods), so that
    what is measured is what trains.
    """

    def __init__(self, ab: "AutoBatch", memory_budget: Union[int, float, str, None],
                 cache: Union[bool, str, os.PathLike], retune: bool, grow_after: Optional[int]):
        self.ab = ab
        self.memory_budget = memory_budget
        self.cache = None if cache is False else PlanCache(None if cache is True else cache)
        self.retune = retune
        self.grow_after = grow_after
        self._fit: Optional[Fit] = None
        #: Whether phase 1 alongside the first micro-batch was measured to fit the budget.
        self._lockstep_fits = True
        self._fitted_micro_batch = 0
        self._key = ""
        self._clean_steps = 0

    # -- the start -------------------------------------------------------------------------------

    def plan_for(self, batch: Any) -> Plan:
        """The plan from the cache, else measured with real steps on ``batch``; agreed over ranks."""
        ab = self.ab
        resident = tensor_bytes(ab.model, ab.optimizer) if ab.device.type == "cpu" else 0
        memory = probe(ab.device, resident_bytes=resident)
        limit = budget(memory, self.memory_budget)
        self._key = plan_key(
            ab.model, ab.optimizer, batch, memory.name, memory.total_bytes, target_batch=ab.target_batch,
            bn=ab.bn, autocast=ab.autocast_dtype, memory_budget=self.memory_budget,
            world_size=ab._ranks.world_size, loss=ab.compute_loss is not None)
        record = None if self.retune or self.cache is None else self.cache.load(self._key)
        device = f"{memory.device} ({memory.name}, {memory.source})"
        if record is not None:
            self._fit = Fit(record["micro_batch"], record["fixed_bytes"], record["per_sample_bytes"],
                            tuple((n, peak) for n, peak in record["points"]))
            micro_batch = min(record["micro_batch"], self._fit.largest_under(limit.budget_bytes, ab._share))
            self._lockstep_fits = record.get("lockstep_fits", False)
            plan = Plan(micro_batch, ab.target_batch, "cache", f"fitted line from {self.cache.path(self._key)}", device,
                        limit.budget_bytes, self._fit.predict(micro_batch), self._fit.points, 0,
                        record.get("phase1_chunks", 1), ab._ranks.world_size, ab.lockstep and self._lockstep_fits)
        else:
            plan = self._measure(batch, limit, device)
            self._store(plan)
        if ab._ranks.active:
            # Every rank runs the same plan: the smallest micro-batch, the most phase-1 chunks.
            # Every rank runs the same plan: the smallest micro-batch, the most phase-1 chunks, and
            # phase 1 alongside the first micro-batch only where it fits on every rank.
            table = ab._ranks.gather([plan.micro_batch, plan.phase1_chunks, plan.lockstep])
            agreed = int(table[:, 0].min()), int(table[:, 1].max()), bool(table[:, 2].min())
            if agreed != (plan.micro_batch, plan.phase1_chunks, plan.lockstep):
                plan = plan.replace(micro_batch=agreed[0], phase1_chunks=agreed[1], lockstep=agreed[2],
                                    reason=plan.reason + "; agreed with the other ranks")
        self._fitted_micro_batch = plan.micro_batch
        log.info("autobatch plan: micro_batch=%d, splits %s (%s, %d trials)", plan.micro_batch, plan.splits,
                 plan.source, plan.trials)
        return plan

    def _measure(self, batch: Any, limit: Budget, device: str) -> Plan:
        ab = self.ab
        with preserved(ab.model, ab.optimizer):
            warm_optimizer_state(ab.optimizer)
            self._fit = fit = search(lambda n: self.trial_peak(batch, n), limit.budget_bytes, ab._share)
            chunks, phase1_points = 1, ()
            self._lockstep_fits = True
            if fit.micro_batch < ab._share and ab._needs_statistics_pass():
                chunks, phase1_points = self._fit_statistics_pass(batch, limit.budget_bytes)
                # Phase 1's random draws stay resident through every micro-batch (autobatch.randomness).
                draws = ab._draws.nbytes
                ab._draws.clear()
                if draws:
                    fit = dataclasses.replace(fit, fixed_bytes=fit.fixed_bytes + draws)
                    fit = self._fit = dataclasses.replace(
                        fit, micro_batch=fit.largest_under(limit.budget_bytes, fit.micro_batch))
                # Alongside the first micro-batch, phase 1's peak adds to that micro-batch's activations.
                self._lockstep_fits = chunks == 1 and (
                    phase1_points[0][1] + fit.per_sample_bytes * fit.micro_batch <= limit.budget_bytes)
        reason = (f"largest micro-batch whose measured peak fits {limit.describe()}; "
                  f"{fit.per_sample_bytes / 2**20:.2f} MiB per sample")
        if ab.lockstep and not self._lockstep_fits:
            reason += "; phase 1 runs before the micro-batches (alongside the first it would pass the budget)"
        return Plan(fit.micro_batch, ab.target_batch, "measured", reason, device, limit.budget_bytes,
                    fit.predict(fit.micro_batch), fit.points, fit.trials + len(phase1_points), chunks,
                    ab._ranks.world_size, ab.lockstep and self._lockstep_fits)

    def trial_peak(self, batch: Any, n: int) -> Optional[int]:
        """The measured peak of one real training micro-step of ``n`` samples; None if out of memory.
        It runs on the module itself: trials must not wait on other ranks' collectives."""
        ab = self.ab
        whole_batch_resident = ab._needs_statistics_pass() and n < ab._share

        def work() -> None:
            # With two_pass the whole logical batch's inputs stay on the device during phase 2.
            whole = to_device(take(batch, ab._share), ab.device) if whole_batch_resident else None
            part = take(whole, n) if whole is not None else to_device(take(batch, n), ab.device)
            ab._backward(ab._micro_loss(part, 1.0, 0, ab._module))
            with undone_on_error(ab._parameters(), ab.optimizer):  # its copies are part of the peak
                ab.optimizer.step()
            for p in ab._parameters():
                p.grad = None

        return self._peak_or_none(work, f"micro-batch of {n}", batch)

    def _fit_statistics_pass(self, batch: Any, budget_bytes: int) -> tuple[int, tuple]:
        """The fewest chunks in which phase 1 (no-grad forward of the whole batch) fits the budget."""
        ab = self.ab
        points = []
        chunks = 1
        while True:
            def work(chunks: int = chunks) -> None:
                ab._draws.clear()
                whole = to_device(take(batch, ab._share), ab.device)
                # A two_pass of this rank alone, for the same reason as the trials.
                ab._statistics_pass(whole, TwoPassBatchNorm(ab._names), BatchNormState(ab._bn_modules), chunks,
                                    measure_layout=False)

            peak = self._peak_or_none(work, f"phase 1 in {chunks} chunk(s)", batch)
            points.append((chunks, peak))
            if peak is not None and peak <= budget_bytes:
                return chunks, tuple(points)
            if chunks >= ab._share:
                raise MemoryError("phase 1 of two_pass does not fit the memory budget even one sample at a "
                                  "time; use bn='micro', or raise memory_budget")
            chunks = min(ab._share, chunks * 2)

    def _peak_or_none(self, work: Callable[[], None], what: str, batch: Any) -> Optional[int]:
        ab = self.ab
        try:
            peak = peak_bytes(work, ab.device, ab.model, ab.optimizer, batch)
        except BaseException as error:
            if not is_out_of_memory(error):
                raise
            peak = None
        if peak is None:
            release_memory(ab.device)
        log.info("autobatch trial, %s: %s", what, "out of memory" if peak is None else f"peak {format_bytes(peak)}")
        return peak

    def _store(self, plan: Plan) -> None:
        """Keep the plan in use, with the fitted line, for the next launch."""
        if self.cache is None or self._fit is None:
            return
        self.cache.store(self._key, {
            "micro_batch": plan.micro_batch, "fixed_bytes": self._fit.fixed_bytes,
            "per_sample_bytes": self._fit.per_sample_bytes, "points": [list(p) for p in self._fit.points],
            "budget_bytes": plan.budget_bytes, "phase1_chunks": plan.phase1_chunks,
            "lockstep_fits": self._lockstep_fits})

    # -- while training --------------------------------------------------------------------------

    def after_out_of_memory(self, plan: Plan, phase: str, message: str) -> Plan:
        """For the same batch: phase 1 before the micro-batches if it failed alongside the first one,
        more phase-1 chunks if it failed in phase 1, else a smaller micro-batch."""
        self._clean_steps = 0
        share = self.ab._share
        if phase == "lockstep":
            self._lockstep_fits = False
            plan = plan.replace(lockstep=False, reason="out of memory with phase 1 alongside the first "
                                                       "micro-batch: phase 1 now runs before the micro-batches")
        elif phase == "phase 1":
            chunks = min(share, plan.phase1_chunks * 2)
            if chunks == plan.phase1_chunks:
                raise MemoryError(f"out of memory in phase 1 one sample at a time ({message})")
            plan = plan.replace(phase1_chunks=chunks, reason=f"out of memory in phase 1: now {chunks} chunks")
        else:
            smaller = shrink(plan.micro_batch)
            plan = plan.replace(micro_batch=smaller,
                                reason=f"out of memory at micro_batch={plan.micro_batch}: shrunk to {smaller}")
        # Not stored: the cache keeps the fitted plan, and a transient shortage must not shrink the next launch.
        log.warning("autobatch ran out of memory (%s); %s; redoing the same logical batch", message, plan.reason)
        return plan

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
