"""The training step: one optimizer step per logical batch, accumulated over micro-batches.

    >>> ab = autobatch.wrap(model, optimizer, target_batch=16, loss_fn=criterion)
    >>> for inputs, targets in loader:        # logical batches of up to 16 samples
    ...     loss = ab.step(inputs, targets)   # float: mean loss over the logical batch

A step agrees on the batch with the other ranks, plans (first step only), then runs the logical
batch as one transaction (autobatch.transaction): the BatchNorm strategy prepares it (two_pass:
phase 1), every micro-batch's forward and backward run under the strategy, the ranks settle before
the last backward, and the update is taken once. Any exception puts everything back; out of memory
redoes the same batch under a smaller plan.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Callable, ContextManager, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from autobatch.batchnorm import BatchNormStrategy, strategy_for
from autobatch.batchnorm.bypass import RunningStatisticsWatch
from autobatch.distributed import (
    RankFailure,
    Ranks,
    check_not_legacy_fsdp,
    ddp_state,
    fsdp_state,
    gradient_sync,
    plain_sync_batch_norm,
)
from autobatch.interrupts import held_interrupts
from autobatch.loss import Losses, check_counts, ignored_labels_warning
from autobatch.microstep import ComputeLoss, LossFn, MicroStep
from autobatch.modes import BatchNormMode, TwoPass
from autobatch.oom import first_line, is_out_of_memory, release_memory
from autobatch.options import MicroBatch, Options, UpdateCopies
from autobatch.phases import Phase, phase_of, tag
from autobatch.plan import Phase1, Plan, fixed_plan
from autobatch.planning.measure import StepMeter
from autobatch.planning.planner import Planner
from autobatch.split import balanced_parts
from autobatch.transaction import Attributes, BatchNormState, Transaction, step_transaction

__all__ = ["AutoBatch", "wrap"]

log = logging.getLogger(__name__)


class StepPlan(NamedTuple):
    """One logical batch's plan as every rank runs it."""

    plan: Plan
    #: Micro-batches on every rank (a rank with fewer samples repeats one at weight 0).
    count: int
    #: Whether to measure the step: a sample size the memory model has not seen (on CUDA: every step).
    measure: bool


class InputsTargets(NamedTuple):
    """``step(inputs, targets)``'s batch: a structure of two parts, never a list of two samples."""

    inputs: Any
    targets: Any


class AutoBatch:
    """A model and its optimizer, stepped once per logical batch of up to ``target_batch`` samples.

    Build it with :func:`wrap`. Each :meth:`step` splits the batch into balanced micro-batches,
    accumulates the gradient of the logical batch's loss, and takes one optimizer step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, options: Options):
        self.model, self.optimizer, self.options = model, optimizer, options
        hook = options.before_step
        self._micro = MicroStep(model, optimizer, options, None if hook is None else lambda: hook(self))
        self._strategy: BatchNormStrategy = strategy_for(options.bn, self._micro)
        self.device, self._ranks = self._micro.device, self._micro.ranks
        self.target_batch = options.target_batch
        self._share = options.target_batch // self._ranks.world_size
        self._planner = Planner(self._micro, self._strategy, options)
        lockstep = isinstance(options.bn, TwoPass) and options.bn.lockstep
        #: None until the first step (or :meth:`tune`) measures it, when micro_batch="auto".
        self.plan: Optional[Plan] = None if options.auto else fixed_plan(
            options.target_batch, options.micro_batch, self._ranks.world_size,
            Phase1.alongside() if lockstep else Phase1.whole(), self._strategy.split_mode)
        #: Whether a step that splits its batch has checked that every BatchNorm went through autobatch.
        self._watched = False
        self._open = True
        #: Count-weighted losses: the items of the last logical batch (autobatch.loss).
        self._items: Optional[float] = None
        self._warned_labels = False
        if self.plan is not None:
            log.info("autobatch plan: micro_batch=%d, splits %s (given)", self.plan.micro_batch, self.plan.splits)

    # -- public -------------------------------------------------------------------------------

    @property
    def bn(self) -> str:
        """The ``bn`` mode asked for ("auto" included; ``plan.bn`` is the one that runs)."""
        return self.options.bn.name

    @property
    def loss_fn(self) -> Optional[LossFn]:
        """``loss_fn(outputs, targets)``; may be replaced between steps."""
        return self._micro.loss_fn

    @loss_fn.setter
    def loss_fn(self, loss_fn: LossFn) -> None:
        self._micro.loss_fn = loss_fn

    def step(self, inputs: Any, targets: Any = None) -> float:
        """Train on one logical batch; returns its mean loss.

        With ``loss_fn``: ``step(inputs, targets)`` computes ``loss_fn(model(inputs), targets)``.
        With ``compute_loss``: ``step(batch)`` computes ``compute_loss(model, micro_batch)``.
        On any error the parameters, gradients, optimizer state, BatchNorm buffers, the RNG and the
        plan are left as they were. With micro_batch="auto", running out of memory shrinks the
        micro-batch and redoes the same batch.
        """
        recovery = self._planner.recovery
        with Transaction(kept=lambda: Attributes([(self, "plan"), (recovery, "clean_steps"),
                                                  (recovery, "lockstep_fits")])):
            batch, sizes, agreed = self._agree_on_batch(inputs, targets)
            if self.plan is None:
                self.plan = self._planner.plan_for(batch)
            return self._until_it_fits(batch, sizes, agreed)

    def tune(self, inputs: Any, targets: Any = None) -> Plan:
        """Measure and plan now, with a sample batch (the first :meth:`step` otherwise does it); later, a
        batch of another sample size is measured by trials, as its first step would measure itself."""
        batch, sizes, _ = self._agree_on_batch(inputs, targets)
        if self.plan is None or not self.options.auto:
            self.plan = self._planner.plan_for(batch)
        else:
            self._planner.learn(self.plan, batch)
        if self.options.auto:
            self.plan = self._agreed(self._planner.for_batch(self.plan, batch), sizes).plan
        return self.plan

    def unwrap(self) -> nn.Module:
        """End training through autobatch and give back the model, exactly as a plain module."""
        self._open = False
        return self.model

    def __enter__(self) -> "AutoBatch":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.unwrap()

    def __repr__(self) -> str:
        micro = self.plan.micro_batch if self.plan is not None else "auto (not measured yet)"
        return (f"AutoBatch(model={type(self.model).__name__}, target_batch={self.target_batch}, "
                f"micro_batch={micro}, bn={self.bn!r})")

    def _until_it_fits(self, batch: Any, sizes: list[int], agreed: Optional[StepPlan]) -> float:
        """The logical batch, taken again under a smaller plan while it runs out of memory."""
        recovered = False
        while True:
            if agreed is None:
                agreed = self._agreed(self._local_plan(batch), sizes)
            self.plan = agreed.plan
            try:
                loss = self._attempt(batch, sizes, agreed)
                break
            except BaseException as error:
                phase = phase_of(error)
                if not self._recoverable(error, phase):
                    raise
                message = first_line(error)
            release_memory(self.device)
            self.plan = self._planner.after_out_of_memory(self.plan, phase, message)
            agreed, recovered = None, True
        if not recovered:
            self.plan = self._planner.after_clean_step(self.plan)
        return loss

    def _recoverable(self, error: BaseException, phase: Phase) -> bool:
        """Out of memory in the micro-batches or phase 1 with a measured plan (with phase 1 alongside
        micro-batch 0, running it first recovers a given plan too); not in the update, which was
        taken again alone already (autobatch.microstep)."""
        return is_out_of_memory(error) and phase is not Phase.UPDATE and (
            self.options.auto or phase is Phase.LOCKSTEP)

    # -- the batch, agreed over ranks -----------------------------------------------------------

    def _checked_batch(self, inputs: Any, targets: Any) -> tuple[Any, int]:
        if not self._open:
            raise RuntimeError("this AutoBatch was unwrapped; wrap the model again to keep training")
        if self._micro.compute_loss is not None and targets is not None:
            raise TypeError("with compute_loss, pass the whole batch as one argument: step(batch)")
        batch = inputs if self._micro.compute_loss is not None else InputsTargets(inputs, targets)
        size = self._micro.batches.size(batch)
        if size > self._share:
            where = "" if self._ranks.world_size == 1 else f" on each of {self._ranks.world_size} ranks"
            raise ValueError(
                f"the batch has {size} samples but the plan holds {self._share}{where} (target_batch="
                f"{self.target_batch}); make the loader yield at most {self._share} samples, or wrap with a "
                "larger target_batch")
        return batch, size

    def _local_plan(self, batch: Any) -> tuple[Plan, bool]:
        """This rank's plan for ``batch`` (its sample size's micro-batch), and whether to measure its step."""
        if not self.options.auto:
            return self.plan, False
        return self._planner.for_batch(self.plan, batch)

    def _agreed(self, local: tuple[Plan, bool], sizes: list[int], table: Optional[Tensor] = None) -> StepPlan:
        """The step every rank runs: as many micro-batches as the rank that needs most, phase 1 in as many
        chunks as the rank that needs most. ``table``: the ranks' rows, gathered already."""
        plan, measure = local
        row = self._plan_row(plan, sizes[self._ranks.rank])
        if not self._ranks.active:
            return StepPlan(plan, row[0], measure)
        if table is None:
            table = self._ranks.gather(row)[:, -3:]
        count, chunks, lockstep = int(table[:, 0].max()), int(table[:, 1].max()), bool(table[:, 2].min())
        phase1 = Phase1.alongside() if lockstep else Phase1.chunked(chunks)
        return StepPlan(plan if phase1 == plan.phase1 else plan.replace(phase1=phase1), count, measure)

    def _plan_row(self, plan: Plan, size: int) -> list[float]:
        """What the ranks compare of a batch's plan: micro-batches needed, phase-1 chunks, lockstep."""
        return [math.ceil(size / plan.micro_batch), plan.phase1.chunks, plan.phase1.lockstep]

    def _agree_on_batch(self, inputs: Any, targets: Any) -> tuple[Any, list[int], Optional[StepPlan]]:
        """Check the batch on every rank at once: a bad batch anywhere raises everywhere, never hangs.
        Returns the batch, every rank's number of samples, and (once a plan exists) the step agreed: the
        one all-gather carries each rank's plan for its batch too."""
        local: Optional[tuple[Plan, bool]] = None
        try:
            batch, size = self._checked_batch(inputs, targets)
            error: Optional[BaseException] = None
            if self.plan is not None:
                local = self._local_plan(batch)
        except (ValueError, TypeError, RuntimeError) as caught:
            batch, size, error = None, 0, caught
        if not self._ranks.active:
            if error is not None:
                raise error
            return batch, [size], None if local is None else self._agreed(local, [size])
        # Every rank must wrap the same way: what the options declare agreed.
        settings = dict(self.options.agreed(), **{"BatchNorm layers": len(self._strategy.layers)})
        planned = self._plan_row(local[0], size) if local is not None else [0, 0, 0]
        table = self._ranks.gather([error is not None, size] + list(settings.values()) + planned)
        failed = [rank for rank in range(self._ranks.world_size) if table[rank, 0]]
        if failed:
            messages = self._ranks.gather_messages("" if error is None else str(error))
            if error is not None:
                raise error
            raise RankFailure(f"rank {failed[0]} rejected its batch: {messages[failed[0]]}")
        for column, name in enumerate(settings, start=2):
            values = table[:, column].tolist()
            if len(set(values)) > 1:
                raise RankFailure(f"the ranks disagree on {name} ({values}); every rank must wrap the same "
                                  "model with the same settings")
        sizes = [int(n) for n in table[:, 1].tolist()]
        return batch, sizes, None if local is None else self._agreed(local, sizes, table[:, -3:])

    # -- one logical batch, all or nothing --------------------------------------------------------

    def _attempt(self, batch: Any, sizes: list[int], agreed: StepPlan) -> float:
        """One logical batch as one transaction: on any exception every gradient, buffer, the RNG and
        the update are put back. ``sizes``: every rank's samples; ``agreed.count`` micro-batches on every
        rank. A step to be measured teaches the memory model its sample size."""
        self._strategy.adopt(self.plan)
        splits = balanced_parts(sizes[self._ranks.rank], agreed.count)
        params = self._micro.parameters()
        synced = plain_sync_batch_norm(self._strategy.layers) if dist.is_available() and dist.is_initialized() \
            else contextlib.nullcontext()
        losses = Losses(self._ranks.world_size, sum(sizes), self._items)
        meter = StepMeter(self.device, self._micro.model, self._micro.optimizer, self._micro.batches.tensors(batch),
                          host=agreed.measure)
        with step_transaction(params, self._strategy.layers) as saved, meter:
            with ddp_state(self._micro.ddp), fsdp_state(self._micro.fsdp), synced:
                loss = self._accumulate(batch, splits, saved["buffers"], losses, meter)
            losses.rescale(params)
            # The update and the step's commit as one: a Ctrl-C between them would put back the step's
            # gradients, buffers and RNG beside an update that stays, and a retried batch would update twice.
            with held_interrupts():
                self._micro.update(params)
                saved.commit()
                for p in params:
                    p.grad = None
        if agreed.measure:
            self._planner.observe(self.plan, max(splits), meter.peak, meter.phase1_peak)
        if losses.total is not None:
            self._items = losses.total
        return loss

    def _accumulate(self, batch: Any, splits: list[int], state: BatchNormState, losses: Losses,
                    meter: StepMeter) -> float:
        """Backward through every micro-batch; returns the logical batch's mean loss (over all ranks)."""
        norm = self._strategy.for_step(splits)
        watch = RunningStatisticsWatch(self._micro.module) if len(splits) > 1 and not self._watched else None
        batches = self._micro.batches
        batch = norm.prepare(batch, splits, state, self.plan.phase1, losses.samples)
        meter.phase1_done(norm.needs_statistics_pass() and not self.plan.phase1.lockstep)
        parts = batches.split(batch, [n for n in splits if n])
        with norm.intercept():
            for index, size in enumerate(splits):
                # A rank with fewer samples than micro-batches repeats one sample at weight 0.
                part = parts[index] if size else batches.take(batch, 1)
                mean_loss = self._micro_batch(norm, part, index, splits, losses, batch)
        state.keep_counted()
        layers = norm.finish()
        if watch is not None:
            watch.check({layer.name for layer in layers}, self._strategy.names)
            self._watched = True
        return mean_loss

    def _micro_batch(self, norm: BatchNormStrategy, part: Any, index: int, splits: list[int], losses: Losses,
                     batch: Any) -> Optional[float]:
        """Forward and backward of micro-batch ``index``; the last one first settles the step with the
        other ranks and returns the logical batch's mean loss."""
        last, first_row, size = index == len(splits) - 1, sum(splits[:index]), splits[index]
        settled = False
        try:
            with self._gradient_sync(last):
                with norm.micro_batch(index, first_row, size):
                    value = self._micro.loss(self._micro.batches.to(part, self.device), index)
                    loss = losses.add(value, size)
                if index == 0 and len(splits) > 1 and not value.counted:
                    self._warn_ignored_labels(part)
                mean_loss = None
                if last:
                    settled = True
                    mean_loss = self._settle(losses, splits, None, batch, norm)
                elif self._micro.fsdp is not None and self._ranks.active:
                    # FSDP2's backward gathers shards from every rank: a rank whose forward or loss failed
                    # must be heard of before it, where every rank still meets (the same row as settling).
                    _, raised = self._ranks.outcome(None, 0.0, 0.0, False)
                    if raised is not None:
                        settled = True  # every rank heard of it here
                        raise raised
                with norm.backward(first_row, size):
                    self._micro.backward(loss)
            return mean_loss
        except BaseException as error:
            if not self._ranks.active or settled:
                raise
            # The other ranks learn of it where they settle the step; then every rank raises.
            self._settle(losses, splits, error, batch, norm)
            raise

    def _warn_ignored_labels(self, part: Any) -> None:
        """Once per wrap: a plain mean over labels with ignored entries is not the logical batch's mean."""
        if self._warned_labels:
            return
        self._warned_labels = True
        message = ignored_labels_warning(*(part if isinstance(part, InputsTargets) else (part,)))
        if message is not None:
            log.warning(message)

    def _gradient_sync(self, last: bool) -> ContextManager[Any]:
        """Gradients reduced over ranks once per logical batch: in the last micro-batch's backward."""
        return gradient_sync(self._micro.ddp, self._micro.fsdp, last)

    def _settle(self, losses: Losses, splits: list[int], failure: Optional[BaseException],
                batch: Any, norm: BatchNormStrategy) -> float:
        """Before the last backward: every loss and count valid and every rank well, or all ranks raise.
        Returns the logical batch's mean loss over all ranks (one device sync per step)."""
        values, counts = losses.local() if losses.values else ([], [])
        error = failure or self._non_finite(values, splits, batch, norm) or (
            check_counts(counts, splits, self._ranks.rank if self._ranks.active else None)
            if losses.counted else None) or norm.check()
        numerator, denominator = losses.sums(values, counts) if values else (0.0, 0.0)
        if not self._ranks.active:
            if error is not None:
                raise error
            return losses.settle(numerator, denominator)
        table, raised = self._ranks.outcome(error, numerator, denominator, error is not None and
                                            phase_of(error) is Phase.LOCKSTEP)
        numerators, denominators, in_lockstep = table[:, 2], table[:, 3], table[:, 4]  # after (failed, oom)
        if raised is not None:
            if raised is not error and in_lockstep.any():
                tag(raised, Phase.LOCKSTEP)  # another rank ran out of memory there: every rank drops the lockstep
            raise raised
        return losses.settle(float(numerators.sum()), float(denominators.sum()))

    def _non_finite(self, values: list[float], splits: list[int], batch: Any,
                    norm: BatchNormStrategy) -> Optional[FloatingPointError]:
        for index, value in enumerate(values):
            if not math.isfinite(value):
                start = sum(splits[:index])
                where = "" if not self._ranks.active else f" on rank {self._ranks.rank}"
                # Under two_pass one sample's NaN reaches every micro-batch through phase 1's statistics.
                samples = self._micro.batches.non_finite_samples(batch)
                culprit = (f"samples {samples} of the logical batch have NaN or infinite values in their inputs "
                           "or targets" if samples else norm.non_finite_culprit())
                return FloatingPointError(
                    f"the loss of micro-batch {index}{where} (samples {start}:{start + splits[index]} of the "
                    f"logical batch) is {value}{'; ' + culprit if culprit else ''}; no optimizer step was taken "
                    "and the model is unchanged. Check the data of those samples and the learning rate")
        return None


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer, target_batch: int, loss_fn: Optional[LossFn] = None,
         *, compute_loss: Optional[ComputeLoss] = None, micro_batch: MicroBatch = "auto",
         bn: Union[str, BatchNormMode] = "two_pass", memory_budget: Union[int, float, str, None] = None,
         cache: Union[bool, str, os.PathLike] = True, scaler: Optional[torch.amp.GradScaler] = None,
         autocast_dtype: Optional[torch.dtype] = None, max_grad_norm: Optional[float] = None,
         before_step: Optional[Callable[[AutoBatch], None]] = None, device: Union[torch.device, str, None] = None,
         grow_after: Optional[int] = None, update_copies: UpdateCopies = "device",
         num_samples: Optional[Callable[[Any], int]] = None,
         split_batch: Optional[Callable[[Any, list[int]], Any]] = None, lockstep: Optional[bool] = None,
         phase1_memory_format: Optional[torch.memory_format] = None, retune: Optional[bool] = None) -> AutoBatch:
    """Train ``model`` with logical batches of ``target_batch`` samples, in micro-batches that fit.

    Args:
        model: the module to train (a DistributedDataParallel one under DDP); it is not modified: no
            hooks, buffers or patches are left behind, and its ``state_dict`` is the plain model's.
        optimizer: the optimizer over the model's parameters; stepped once per logical batch.
        target_batch: the logical batch size of the training recipe, over all ranks. A shorter batch
            (the last of an epoch) is fine, a larger one is an error.
        loss_fn: ``loss_fn(model(inputs), targets)``, called per micro-batch; returns the micro-batch's
            mean loss, or ``(loss_sum, count)``: its loss summed over ``count`` items (valid tokens,
            labelled pixels), which makes the step's loss the logical batch's sum over its items.
        compute_loss: instead of ``loss_fn``, ``compute_loss(model, micro_batch)`` for losses that need
            more than ``(outputs, targets)``; then call ``step(batch)``. Returns as ``loss_fn`` does.
        micro_batch: samples per micro-batch (an int), or "auto" (default): the largest that fits,
            measured with real steps at the first step.
        bn: how BatchNorm layers see the logical batch. "two_pass" (default, or
            ``autobatch.TwoPass(lockstep=..., phase1_memory_format=..., precise=...)``): a no-grad forward
            of the whole batch records its statistics, every micro-batch normalizes with them; with
            ``precise=True`` the backward is the full batch's exactly, computed segment by segment. "micro"
            (``autobatch.Micro()``): each micro-batch its own statistics, running statistics committed
            once. "exact" (``autobatch.Exact()``): the whole batch in one piece under activation
            checkpointing, exactly the full batch's step. "auto" (``autobatch.Auto()``): exact where
            the whole batch fits and pays, else two_pass with the precise backward where it can run.
        memory_budget: cap for "auto": bytes, a string such as "6GiB", or a fraction of the device's
            memory such as 0.8 (default None: all the device has free). A 10% margin is kept below it.
        cache: keep the measured plan across launches: True (default; ``$AUTOBATCH_CACHE_DIR`` or
            ``~/.cache/autobatch``), a directory, False (never), or "refresh" (measure afresh, keep it).
        scaler: a ``torch.amp.GradScaler``; losses are scaled per micro-batch, unscaled once per step.
        autocast_dtype: e.g. ``torch.bfloat16``: forward passes run under ``torch.autocast``.
        max_grad_norm: clip the logical batch's gradient to this norm, once, after unscaling.
        before_step: ``before_step(ab)``, called before each optimizer step with the final gradients.
        device: where micro-batches are computed; defaults to the model's device.
        grow_after: after running out of memory, grow back to the measured micro-batch after this many
            clean steps (default None: stay small).
        update_copies: where the copies that undo a failed optimizer update live: "device" (default),
            "host" (no device memory; a device-to-host copy per step), or "none" (an error inside the
            update may leave it half applied, and is then not taken again).
        num_samples: for a batch type of your own, ``num_samples(batch)`` counts its samples (with
            ``split_batch``).
        split_batch: for a batch type of your own, ``split_batch(batch, sizes)`` cuts it into
            ``len(sizes)`` batches of those sizes, in order (with ``num_samples``).
        lockstep: deprecated; use ``bn=autobatch.TwoPass(lockstep=...)``.
        phase1_memory_format: deprecated; use ``bn=autobatch.TwoPass(phase1_memory_format=...)``.
        retune: deprecated; use ``cache="refresh"``.

    Returns:
        The ``AutoBatch`` to train with: ``ab.step(inputs, targets)`` per logical batch.

    Example::

        ab = autobatch.wrap(model, optimizer, target_batch=16, loss_fn=nn.CrossEntropyLoss())
        for inputs, targets in loader:
            loss = ab.step(inputs, targets)
    """
    moved = {name: value for name, value in (("lockstep", lockstep), ("phase1_memory_format", phase1_memory_format),
                                             ("retune", retune)) if value is not None}
    check_not_legacy_fsdp(model)
    options = Options.build(
        model, optimizer, target_batch, Ranks.of(model).world_size, loss_fn=loss_fn, compute_loss=compute_loss,
        micro_batch=micro_batch, bn=bn, scaler=scaler, autocast_dtype=autocast_dtype, max_grad_norm=max_grad_norm,
        before_step=before_step, device=device, memory_budget=memory_budget, cache=cache, grow_after=grow_after,
        update_copies=update_copies, num_samples=num_samples, split_batch=split_batch, **moved)
    return AutoBatch(model, optimizer, options)
