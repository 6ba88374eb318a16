"""Sizing the whole logical batch in one piece (bn="exact"), under the fastest checkpointing policy that
fits; and bn="auto"'s choice between that and micro-batches, where the whole batch is not worth it.

    sizing = WholeBatchSizing(setting)                               # bn="exact"
    sizing = WholeOrSplitSizing(setting, WholeBatchSizing(setting), split)    # bn="auto"
    plan = sizing.measure(state, batch)     # every policy's whole-batch trial (and auto's split)
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from autobatch.checkpointing import Checkpointing
from autobatch.checkpointing import candidates as checkpointing_candidates
from autobatch.distributed import Ranks
from autobatch.modes import Mode
from autobatch.oom import PlanDoesNotFit, first_line
from autobatch.plan import Candidate, Plan
from autobatch.planning.measure import warm_optimizer_state
from autobatch.planning.micro_batches import described
from autobatch.planning.model import MemoryModel
from autobatch.planning.search import shrink
from autobatch.planning.sizing import Sizing
from autobatch.planning.state import PlannerState, Setting
from autobatch.planning.trials import Trials, timed
from autobatch.sizes import format_bytes
from autobatch.stages import Stage
from autobatch.transaction import trial_transaction

__all__ = ["AUTO_SLOWDOWN", "Fitting", "WholeBatchSizing", "WholeOrSplitSizing", "slowest", "whole_batch_candidates"]

log = logging.getLogger(__name__)

#: bn="auto" takes the whole batch with checkpointing where its step takes at most this many times
#: plain accumulation's at the largest micro-batch that fits.
AUTO_SLOWDOWN = 1.5

#: A policy that fits: (its step's seconds, the policy, its peak bytes).
Fitting = tuple[float, Checkpointing, int]


def slowest(ranks: Ranks, seconds: list[Optional[float]]) -> list[Optional[float]]:
    """Per entry, the slowest rank's time; None where any rank has none."""
    table = ranks.gather([-1.0 if value is None else value for value in seconds])
    return [None if (column < 0).any() else float(column.max()) for column in table.T]


def whole_batch_candidates(trials: Trials, ranks: Ranks, batch: Any,
                           budget_bytes: int) -> tuple[list[Candidate], list[Fitting]]:
    """Every checkpointing policy's whole-batch peak, and those that fit (on every rank, its time the
    slowest rank's: every rank must checkpoint alike, since recomputed BatchNorm layers meet the other
    ranks in backward); stops at no checkpointing if that fits."""
    policies, candidates = checkpointing_candidates(trials.micro.module), []
    for policy in policies:
        work = trials.whole_batch_step(batch, policy)
        try:
            peak = trials.peak(work, f"whole batch, checkpointing {policy.label}", batch)
        except RuntimeError as error:
            if not policy:
                raise
            # A layer that changes its input or output in place breaks checkpointing at its boundary:
            # that policy is out, the model is not.
            log.info("autobatch trial, whole batch, checkpointing %s: fails (%s)", policy.label, first_line(error))
            candidates.append(Candidate(f"{policy.label} (fails: {first_line(error)[:60]})", None, None, True))
            continue
        # Timed apart: the host's memory tracking slows every operation.
        seconds = timed(work, trials.micro.device, trials) if peak is not None and peak <= budget_bytes else None
        candidates.append(Candidate(policy.label, peak, seconds, True))
        if seconds is not None and not policy and not ranks.active:
            break
    times = slowest(ranks, [c.seconds for c in candidates])
    fitting = [(seconds, policy, c.peak_bytes) for seconds, policy, c in zip(times, policies, candidates)
               if seconds is not None]
    return candidates, fitting


class WholeBatchSizing(Sizing):
    """bn="exact": the fastest checkpointing policy whose whole-batch peak fits; checked again at every new
    sample size."""

    def measure(self, state: PlannerState, batch: Any) -> Plan:
        g = self.setting
        with trial_transaction(g.micro.model, g.micro.optimizer):
            warm_optimizer_state(g.micro.optimizer)
            candidates, fitting = whole_batch_candidates(g.trials, g.ranks, batch, state.limit.budget_bytes)
        return self.plan_of(state, batch, candidates, fitting)

    def plan_of(self, state: PlannerState, batch: Any, candidates: list[Candidate], fitting: list[Fitting]) -> Plan:
        """The plan of the fastest fitting policy; the memory model starts from its peak."""
        g = self.setting
        if not fitting:
            smallest = min((c.peak_bytes for c in candidates if c.peak_bytes is not None), default=None)
            raise PlanDoesNotFit(
                f"bn='exact' does not fit: the whole batch of {g.share} peaked at "
                f"{format_bytes(smallest) if smallest is not None else 'out of memory'} at best (under every "
                f"checkpointing policy tried) against a budget of {format_bytes(state.limit.budget_bytes)}; use "
                "bn='two_pass', which splits the batch, or a larger memory_budget")
        seconds, policy, peak = min(fitting, key=lambda fit: fit[0])
        reason = (f"the whole batch in one piece fits {state.limit.describe()}" + (
            f" with {len(policy.modules)} modules checkpointed ({policy.label}), the fastest that fits" if policy
            else " without checkpointing"))
        s = g.micro.batches.sample_size(batch)
        state.model, state.phase1 = MemoryModel(0.0, [(g.share, s, peak)]), None
        plan = Plan(capacity=g.share, target_batch=g.options.target_batch, source="measured", reason=reason,
                    device=state.device, budget_bytes=state.limit.budget_bytes, predicted_peak_bytes=peak,
                    points=((g.share, peak),), trials=len(candidates), world_size=g.ranks.world_size, bn=Mode.EXACT,
                    checkpointing=policy, candidates=tuple(candidates))
        return self.for_size(state, plan, s)

    def from_record(self, state: PlannerState, base: Plan, batch: Any, path: str) -> Optional[Plan]:
        g = self.setting
        if base.bn is not Mode.EXACT:
            return None
        s = g.micro.batches.sample_size(batch)
        peak = state.model.predict(g.share, s)
        if peak > state.limit.budget_bytes:
            log.warning("autobatch: the cached whole-batch plan %s peaked at %s, over today's budget of %s; measuring "
                        "afresh", path, format_bytes(peak), format_bytes(state.limit.budget_bytes))
            return None
        return self.for_size(state, base, s)

    def for_size(self, state: PlannerState, plan: Plan, s: int, batch: Any = None) -> Plan:
        return plan.replace(predicted_peak_bytes=state.model.predict(self.setting.share, s),
                            **described(state.model, s))

    def for_batch(self, state: PlannerState, plan: Plan, batch: Any, s: int) -> Optional[tuple[Plan, bool]]:
        """At a new sample size: verified once with a trial of the whole batch under the plan's checkpointing;
        planned afresh there if it would not fit."""
        g = self.setting
        if s == plan.sample_size:
            return plan, False
        if not state.model.covers(s) and g.micro.collective:
            if state.model.predict(g.share, s) <= state.limit.budget_bytes:
                return self.for_size(state, plan, s), False  # the bound fits; the step measures
            raise PlanDoesNotFit(
                f"bn='exact' with a fully_shard model: the whole batch at {s} elements per sample may not fit under "
                "its checkpointing, and FSDP2's trials must run on every rank at once; tune on the largest batch "
                "first (ab.tune on every rank), or use bn='two_pass'")
        if not state.model.covers(s):
            with trial_transaction(g.micro.model, g.micro.optimizer):
                warm_optimizer_state(g.micro.optimizer)
                work = g.trials.whole_batch_step(batch, plan.checkpointing)
                peak = g.trials.peak(work, f"whole batch at {s} elements per sample", batch)
            state.model.add(g.share, s, peak if peak is not None else 2 * state.limit.budget_bytes)
        if state.model.predict(g.share, s) <= state.limit.budget_bytes:
            return self.for_size(state, plan, s), False
        log.info("autobatch: the whole batch at %d elements per sample passes the budget under %s; planning afresh",
                 s, plan.checkpointing.label)
        return None

    def after_out_of_memory(self, state: PlannerState, plan: Plan, stage: Stage, message: str) -> Plan:
        raise PlanDoesNotFit(f"bn='exact' ran out of memory with the whole batch of {self.setting.share} ({message}) "
                             f"under checkpointing {plan.checkpointing.label}; plan again with a smaller memory_budget "
                             "(and cache='refresh'), or use bn='two_pass'")


class WholeOrSplitSizing(Sizing):
    """bn="auto": the whole batch where a checkpointing policy fits; with ``Auto(by_timing=True)``, only where
    it needs no checkpointing or costs at most AUTO_SLOWDOWN x plain accumulation at the largest micro-batch
    that fits. Else ``split``'s micro-batches.
    A plan's mode says which of the two sizes it from then on."""

    def __init__(self, setting: Setting, whole: WholeBatchSizing, split: Sizing):
        super().__init__(setting)
        self.whole = whole
        self.split = split

    def _of(self, plan: Plan) -> Sizing:
        return self.whole if plan.bn is Mode.EXACT else self.split

    def measure(self, state: PlannerState, batch: Any) -> Plan:
        g = self.setting
        with trial_transaction(g.micro.model, g.micro.optimizer):
            warm_optimizer_state(g.micro.optimizer)
            candidates, fitting = whole_batch_candidates(g.trials, g.ranks, batch, state.limit.budget_bytes)
        best = min(fitting, key=lambda fit: fit[0]) if fitting else None
        if best is not None and (not best[1] or not g.options.bn.by_timing):
            # No checkpointing needed: nothing is faster. Or checkpointed, where choices by timing are off
            # (modes.timed_choices): the whole batch's exact gradient, from memory alone, the same every run.
            return self.whole.plan_of(state, batch, candidates, fitting)
        plan = self.split.measure(state, batch)
        with trial_transaction(g.micro.model, g.micro.optimizer):
            warm_optimizer_state(g.micro.optimizer)
            seconds = timed(g.trials.micro_step(batch, plan.micro_batch), g.micro.device, g.trials) * len(plan.splits)
        seconds = slowest(g.ranks, [seconds])[0]
        candidates.append(Candidate(f"{plan.bn}, micro_batch {plan.micro_batch}", plan.predicted_peak_bytes,
                                    seconds, False))
        if best is None or best[0] > AUTO_SLOWDOWN * seconds:
            why = "no checkpointing policy fits" if best is None else (
                f"the best fitting policy ({best[1].label}) took {best[0] / seconds:.2f}x plain accumulation's "
                f"time, over {AUTO_SLOWDOWN}x")
            return plan.replace(candidates=tuple(candidates), reason=f"{plan.reason}; whole batch: {why}")
        return self.whole.plan_of(state, batch, candidates, fitting)

    def from_record(self, state: PlannerState, base: Plan, batch: Any, path: str) -> Optional[Plan]:
        return self._of(base).from_record(state, base, batch, path)

    def for_size(self, state: PlannerState, plan: Plan, s: int, batch: Any = None) -> Plan:
        return self._of(plan).for_size(state, plan, s, batch)

    def for_batch(self, state: PlannerState, plan: Plan, batch: Any, s: int) -> Optional[tuple[Plan, bool]]:
        return self._of(plan).for_batch(state, plan, batch, s)

    def learn(self, state: PlannerState, plan: Plan, batch: Any, s: int) -> bool:
        return self._of(plan).learn(state, plan, batch, s)

    def after_out_of_memory(self, state: PlannerState, plan: Plan, stage: Stage, message: str) -> Plan:
        """Out of memory with the whole batch: micro-batches from then on (the split's own recovery after that)."""
        if plan.bn is not Mode.EXACT:
            return self.split.after_out_of_memory(state, plan, stage, message)
        smaller = shrink(plan.micro_batch)
        split = plan.replace(bn=self.setting.strategy.split_mode, capacity=smaller, checkpointing=Checkpointing())
        return state.recovery.cap(split.replace(
            reason=f"out of memory with the whole batch in one piece: {split.bn} in micro-batches of {split.micro_batch}"))

    def grown(self, state: PlannerState, plan: Plan) -> Plan:
        return self._of(plan).grown(state, plan)
