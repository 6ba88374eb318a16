"""bn="exact" and bn="auto": the whole logical batch in one piece, under the fastest checkpointing
policy that fits; or, for auto, two_pass where that is not worth it.

    candidates, fitting = whole_batch_candidates(trials, ranks, batch, budget_bytes)
    plan = choose(candidates, fitting, ...)          # exact's plan, or auto's two_pass plan
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from autobatch.checkpointing import Checkpointing
from autobatch.checkpointing import candidates as checkpointing_candidates
from autobatch.distributed import Ranks
from autobatch.modes import Mode
from autobatch.oom import first_line
from autobatch.plan import Candidate, Phase1, Plan
from autobatch.planning.memory import Budget
from autobatch.planning.search import Fit
from autobatch.planning.trials import Trials, timed
from autobatch.sizes import format_bytes

__all__ = ["AUTO_SLOWDOWN", "Fitting", "slowest", "whole_batch_candidates", "whole_batch_plan"]

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


def whole_batch_plan(trials: Trials, ranks: Ranks, batch: Any, limit: Budget, device: str, target_batch: int,
                     prefers_split: bool, split: Callable[[], Plan]) -> tuple[Plan, Optional[Fit]]:
    """bn="exact": the fastest checkpointing policy whose whole-batch peak fits. bn="auto"
    (``prefers_split``): that, if it needs no checkpointing or costs at most AUTO_SLOWDOWN x plain
    accumulation; else ``split()``, two_pass's plan. Returns the plan, and the whole batch's fit (None
    when the split plan was chosen)."""
    candidates, fitting = whole_batch_candidates(trials, ranks, batch, limit.budget_bytes)
    best = min(fitting, key=lambda fit: fit[0]) if fitting else None
    share = trials.share
    if prefers_split and (best is None or best[1]):
        plan = split()
        seconds = timed(trials.micro_step(batch, plan.micro_batch), trials.micro.device, trials) * len(plan.splits)
        seconds = slowest(ranks, [seconds])[0]
        candidates.append(Candidate(f"{plan.bn}, micro_batch {plan.micro_batch}", plan.predicted_peak_bytes,
                                    seconds, False))
        if best is None or best[0] > AUTO_SLOWDOWN * seconds:
            why = "no checkpointing policy fits" if best is None else (
                f"the best fitting policy ({best[1].label}) took {best[0] / seconds:.2f}x plain accumulation's "
                f"time, over {AUTO_SLOWDOWN}x")
            return plan.replace(candidates=tuple(candidates), reason=f"{plan.reason}; whole batch: {why}"), None
    if best is None:
        smallest = min((c.peak_bytes for c in candidates if c.peak_bytes is not None), default=None)
        raise MemoryError(
            f"bn='exact' does not fit: the whole batch of {share} peaked at "
            f"{format_bytes(smallest) if smallest is not None else 'out of memory'} at best (under every "
            f"checkpointing policy tried) against a budget of {format_bytes(limit.budget_bytes)}; use "
            "bn='two_pass', which splits the batch, or a larger memory_budget")
    seconds, policy, peak = best
    fit = Fit(share, peak, 0, ((share, peak),))
    reason = (f"the whole batch in one piece fits {limit.describe()}" + (
        f" with {len(policy.modules)} modules checkpointed ({policy.label}), the fastest that fits" if policy
        else " without checkpointing"))
    return Plan(share, target_batch, "measured", reason, device, limit.budget_bytes, peak, fit.points,
                len(candidates), Phase1.whole(), ranks.world_size, bn=Mode.EXACT, checkpointing=policy,
                candidates=tuple(candidates)), fit
