"""One attempt at one logical batch: its micro-batches' forwards and backwards, the ranks settled before
the last backward, and one optimizer update, as one transaction.

    step = LogicalStep(micro, strategy, plan, batch, sizes=[16], count=3, measure=False, reference=None)
    loss = step.run()          # the logical batch's mean loss; on any error everything is put back
    step.meter.peak            # what the step measured (where ``measure``)

The step drives the BatchNorm strategy the same way for every mode (autobatch.batchnorm.strategy) and
the model through MicroStep (autobatch.microstep); AutoBatch (autobatch.step) decides the plan and
takes the batch again under a smaller one after running out of memory.
"""
from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple, Optional

from autobatch.batchnorm.bypass import RunningStatisticsWatch
from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.distributed import ddp_state, fsdp_state, gradient_sync, plain_sync_batch_norm
from autobatch.interrupts import held_interrupts
from autobatch.loss import Losses, check_counts, ignored_labels_warning
from autobatch.microstep import MicroStep
from autobatch.plan import Plan
from autobatch.planning.measure import StepMeter
from autobatch.split import balanced_parts
from autobatch.transaction import BatchNormState, step_transaction

__all__ = ["InputsTargets", "LogicalStep"]

log = logging.getLogger(__name__)


class InputsTargets(NamedTuple):
    """``step(inputs, targets)``'s batch: a structure of two parts, never a list of two samples."""

    inputs: Any
    targets: Any


class LogicalStep:
    """One logical batch under ``plan``: ``sizes`` every rank's samples, ``count`` micro-batches on every
    rank (a rank with fewer samples repeats one at weight 0). ``reference``: the items of the last logical
    batch (count-weighted losses, autobatch.loss). What a wrap checks or warns of once ("watched", "labels")
    is ``micro.once``, shared by its steps and strategies."""

    def __init__(self, micro: MicroStep, strategy: BatchNormStrategy, plan: Plan, batch: Any, sizes: list[int],
                 count: int, measure: bool, reference: Optional[float]):
        self.micro, self.strategy, self.plan, self.batch = micro, strategy, plan, batch
        self.ranks = micro.ranks
        self.splits = balanced_parts(sizes[self.ranks.rank], count)
        self.losses = Losses(self.ranks.world_size, sum(sizes), reference)
        # A step measured on the host stops at the plan's budget, out of memory, as a device would stop it: its
        # recovery then redoes the batch smaller, and no step passes the budget.
        self.meter = StepMeter(micro.device, micro.model, micro.optimizer, micro.batches.tensors(batch), host=measure,
                               limit=micro.memory_stop(plan.budget_bytes))
        self.norm: BatchNormStrategy = strategy

    def run(self, update: bool = True) -> float:
        """Every micro-batch's forward and backward, then the update; returns the logical batch's mean loss
        over all ranks. On any exception every gradient, buffer, the RNG and the update are put back.

        ``update=False``: no update; the logical batch's gradient is added to the gradients the caller
        held, as ``loss.backward()`` adds to them (scaled by the scaler, if one is given, as
        ``scaler.scale(loss).backward()`` leaves them)."""
        self.strategy.adopt(self.plan)
        params = self.micro.parameters()
        with step_transaction(params, self.strategy.layers) as saved, self.meter:
            with ddp_state(self.micro.ddp), fsdp_state(self.micro.fsdp), plain_sync_batch_norm(self.strategy.layers):
                loss = self._accumulate(saved["buffers"])
            self.losses.rescale(params)
            if not update:
                self.micro.check_finite_gradient(params)
            # The update and the step's commit as one: a Ctrl-C between them would put back the step's
            # gradients, buffers and RNG beside an update that stays, and a retried batch would update twice.
            with held_interrupts():
                if update:
                    self.meter.update_starts()
                    self.micro.update(params)
                else:
                    saved["gradients"].add_to_current()
                saved.commit()
                if update:
                    for p in params:
                        p.grad = None
        return loss

    def _accumulate(self, state: BatchNormState) -> float:
        """Backward through every micro-batch; returns the logical batch's mean loss (over all ranks)."""
        splits, batches = self.splits, self.micro.batches
        chunks = self.plan.phase1_chunks
        norm = self.strategy.for_step(splits, chunks)
        watched = len(splits) > 1 and "watched" not in self.micro.once
        watch = RunningStatisticsWatch(self.micro.module) if watched else None
        batch, norm = norm.prepare(self.batch, splits, chunks, self.losses.samples)
        self.batch, self.norm = batch, norm
        state.forwards_done(chunks if norm.needs_phase1() else 0)
        self.meter.phase1_done(norm.needs_phase1())
        parts = batches.split(batch, [n for n in splits if n])
        with norm.intercept():
            for index, size in enumerate(splits):
                part = parts[index] if size else batches.take(batch, 1)
                mean_loss = self._micro_batch(part, index, state)
        if norm.has_segment_backward:
            self.meter.micro_batches_done()  # the segment backward's memory is measured apart (planning.model)
            norm.after_micro_batches()
        state.count_once()
        layers = norm.finish()
        if watch is not None:
            watch.check({layer.name for layer in layers}, self.strategy.names)
            self.micro.once.add("watched")
        return mean_loss

    def _micro_batch(self, part: Any, index: int, state: BatchNormState) -> Optional[float]:
        """Forward and backward of micro-batch ``index``; the last one first settles the step with the
        other ranks and returns the logical batch's mean loss."""
        splits, norm, micro = self.splits, self.norm, self.micro
        last, first_row, size = index == len(splits) - 1, sum(splits[:index]), splits[index]
        settled = False
        try:
            # A segment backward after the micro-batches computes every gradient; it averages them over the ranks.
            with gradient_sync(micro.ddp, micro.fsdp, last and not norm.has_segment_backward):
                with norm.micro_batch(index, first_row, size):
                    value = micro.loss(micro.batches.to(part, micro.device), index)
                    loss = self.losses.add(value, size)
                state.forwards_done(1)
                if index == 0 and len(splits) > 1 and not value.count_weighted:
                    self._warn_ignored_labels(self.batch)
                mean_loss = None
                if last:
                    settled = True
                    mean_loss = self._settle(None)
                elif micro.collective:
                    # FSDP2's backward gathers shards from every rank: a rank whose forward or loss failed
                    # must be heard of before it, where every rank still meets (the same row as settling).
                    _, raised = self.ranks.outcome(None, 0.0, 0.0)
                    if raised is not None:
                        settled = True  # every rank heard of it here
                        raise raised
                with norm.backward(first_row, size):
                    micro.backward(loss)
            return mean_loss
        except BaseException as error:
            if not self.ranks.active or settled:
                raise
            # The other ranks learn of it where they settle the step; then every rank raises.
            self._settle(error)
            raise

    def _warn_ignored_labels(self, batch: Any) -> None:
        """Once per wrap: a plain mean over labels with ignored entries is not the logical batch's mean. The
        whole logical batch is looked at (a length-grouped batch may pad only its later rows), each step until
        it is said."""
        if "labels" in self.micro.once:
            return
        message = ignored_labels_warning(*(batch if isinstance(batch, InputsTargets) else (batch,)))
        if message is not None:
            self.micro.once.add("labels")
            log.warning(message)

    def _settle(self, failure: Optional[BaseException]) -> float:
        """Before the last backward: every loss and count valid and every rank well, or all ranks raise.
        Returns the logical batch's mean loss over all ranks (one device sync per step)."""
        losses = self.losses
        values, counts = losses.local() if losses.values else ([], [])
        error = failure or self._non_finite(values) or (
            check_counts(counts, self.splits, self.ranks.rank if self.ranks.active else None)
            if losses.count_weighted else None) or self.norm.check()
        numerator, denominator = losses.sums(values, counts) if values else (0.0, 0.0)
        if not self.ranks.active:
            if error is not None:
                raise error
            return losses.settle(numerator, denominator)
        table, raised = self.ranks.outcome(error, numerator, denominator)
        if raised is not None:
            raise raised
        return losses.settle(float(table[:, 2].sum()), float(table[:, 3].sum()))  # after (failed, out of memory)

    def _non_finite(self, values: list[float]) -> Optional[FloatingPointError]:
        for index, value in enumerate(values):
            if not math.isfinite(value):
                start = sum(self.splits[:index])
                where = "" if not self.ranks.active else f" on rank {self.ranks.rank}"
                # Under two_pass one sample's NaN reaches every micro-batch through phase 1's statistics.
                samples = self.micro.batches.non_finite_samples(self.batch)
                culprit = (f"samples {samples} of the logical batch have NaN or infinite values in their inputs "
                           "or targets" if samples else self.norm.non_finite_culprit())
                return FloatingPointError(
                    f"the loss of micro-batch {index}{where} (samples {start}:{start + self.splits[index]} of the "
                    f"logical batch) is {value}{'; ' + culprit if culprit else ''}; no optimizer step was taken "
                    "and the model is unchanged. Check the data of those samples and the learning rate")
        return None
