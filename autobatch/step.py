"""The training step: one optimizer step per logical batch, accumulated over micro-batches.

    >>> ab = autobatch.wrap(model, optimizer, target_batch=16, loss_fn=criterion)
    >>> for inputs, targets in loader:        # logical batches of up to 16 samples
    ...     loss = ab.step(inputs, targets)   # float: mean loss over the logical batch

A step agrees on the batch with the other ranks, plans (first step only), then runs the logical
batch all or nothing: the BatchNorm strategy prepares it (two_pass: phase 1), every micro-batch's
forward and backward run under the strategy, the ranks settle before the last backward, and the
update is taken once. Out of memory anywhere redoes the same batch under a smaller plan.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Callable, ContextManager, Literal, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from autobatch.arguments import check_arguments, share_of
from autobatch.batchnorm import BN_MODES, BatchNormMode, BatchNormStrategy, strategy_for
from autobatch.batchnorm.bypass import RunningStatisticsWatch
from autobatch.batchnorm.layout import PHASE1_FORMATS, check_phase1_memory_format
from autobatch.batchnorm.statistics import BatchNormState
from autobatch.distributed import RankFailure, ddp_state, plain_sync_batch_norm
from autobatch.loss import Losses, check_counts
from autobatch.microstep import ComputeLoss, LossFn, MicroStep
from autobatch.phases import Phase, phase_of, tag
from autobatch.planning.memory import check_memory_budget, first_line, is_out_of_memory, release_memory
from autobatch.planning.planner import Phase1, Plan, check_micro_batch, fixed_plan
from autobatch.planning.tuning import Tuner
from autobatch.snapshot import UpdateCopies
from autobatch.split import balanced_parts, batch_format

__all__ = ["AutoBatch", "wrap"]

log = logging.getLogger(__name__)

MicroBatch = Union[int, Literal["auto"]]


class InputsTargets(NamedTuple):
    """``step(inputs, targets)``'s batch: a structure of two parts, never a list of two samples."""

    inputs: Any
    targets: Any


class AutoBatch:
    """A model and its optimizer, stepped once per logical batch of up to ``target_batch`` samples.

    Build it with :func:`wrap`. Each :meth:`step` splits the batch into balanced micro-batches,
    accumulates the gradient of the logical batch's mean loss, and takes one optimizer step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, target_batch: int,
                 loss_fn: Optional[LossFn] = None, *, compute_loss: Optional[ComputeLoss] = None,
                 micro_batch: MicroBatch = "auto", bn: BatchNormMode = "two_pass",
                 scaler: Optional[torch.amp.GradScaler] = None,
                 autocast_dtype: Optional[torch.dtype] = None, max_grad_norm: Optional[float] = None,
                 before_step: Optional[Callable[["AutoBatch"], None]] = None,
                 device: Optional[Union[torch.device, str]] = None,
                 memory_budget: Union[int, float, str, None] = None,
                 cache: Union[bool, str, os.PathLike] = True, retune: bool = False,
                 grow_after: Optional[int] = None, lockstep: bool = False,
                 phase1_memory_format: Optional[torch.memory_format] = None, update_copies: UpdateCopies = "device",
                 num_samples: Optional[Callable[[Any], int]] = None,
                 split_batch: Optional[Callable[[Any, list[int]], Any]] = None):
        check_arguments(model, optimizer, loss_fn, compute_loss, scaler, autocast_dtype, max_grad_norm,
                        before_step, grow_after, update_copies)
        check_phase1_memory_format(phase1_memory_format)
        self.model, self.optimizer, self.before_step = model, optimizer, before_step
        self._micro = MicroStep(model, optimizer, loss_fn, compute_loss, scaler, autocast_dtype, max_grad_norm,
                                None if before_step is None else lambda: before_step(self),
                                None if device is None else torch.device(device), update_copies,
                                batch_format(num_samples, split_batch))
        self._strategy: BatchNormStrategy = strategy_for(bn, self._micro, lockstep, phase1_memory_format)
        self.bn, self.device, self._ranks = bn, self._micro.device, self._micro.ranks
        self.target_batch = target_batch
        self._share = share_of(target_batch, self._ranks.world_size)
        self._auto = check_micro_batch(micro_batch) == "auto"
        check_memory_budget(memory_budget)
        if not self._auto and (self._strategy.whole_batch_only or self._strategy.prefers_whole_batch):
            raise ValueError(f"bn={bn!r} plans its own micro-batch (the whole batch where it fits); leave "
                             f"micro_batch='auto', or use bn='two_pass' with micro_batch={micro_batch}")
        if memory_budget is not None and not self._auto:
            raise ValueError(f"memory_budget applies to micro_batch='auto'; with micro_batch={micro_batch} "
                             "drop memory_budget, or pass micro_batch='auto' to have the budget measured")
        #: What the ranks compare before each step: every rank must wrap the same way.
        self._settings = {"target_batch": target_batch, "micro_batch mode": self._auto, "bn": BN_MODES.index(bn),
                          "BatchNorm layers": len(self._strategy.layers), "lockstep": lockstep,
                          "phase1_memory_format": PHASE1_FORMATS.index(phase1_memory_format)}
        self._tuner = Tuner(self._micro, self._strategy, target_batch, memory_budget, cache, retune, grow_after,
                            lockstep)
        #: None until the first step (or :meth:`tune`) measures it, when micro_batch="auto".
        self.plan: Optional[Plan] = None if self._auto else fixed_plan(
            target_batch, micro_batch, self._ranks.world_size, Phase1.alongside() if lockstep else Phase1.whole(),
            self._strategy.split_mode)
        #: Whether a step that splits its batch has checked that every BatchNorm went through autobatch.
        self._watched = False
        self._open = True
        #: Count-weighted losses: the items of the last logical batch (autobatch.loss).
        self._items: Optional[float] = None
        if self.plan is not None:
            log.info("autobatch plan: micro_batch=%d, splits %s (given)", self.plan.micro_batch, self.plan.splits)

    # -- public -------------------------------------------------------------------------------

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
        On any error the parameters, gradients and BatchNorm buffers are left as they were. With
        micro_batch="auto", running out of memory shrinks the micro-batch and redoes the same batch.
        """
        batch, sizes = self._agree_on_batch(inputs, targets)
        if self.plan is None:
            self.plan = self._tuner.plan_for(batch)
        recovered = False
        while True:
            try:
                loss = self._step(batch, sizes)
                break
            except BaseException as error:
                # Running out of memory with phase 1 alongside micro-batch 0 only drops the lockstep.
                phase = phase_of(error)
                if not (is_out_of_memory(error) and (self._auto or phase is Phase.LOCKSTEP)):
                    raise
                message = first_line(error)
            release_memory(self.device)
            self.plan = self._tuner.after_out_of_memory(self.plan, phase, message)
            recovered = True
        if not recovered:
            self.plan = self._tuner.after_clean_step(self.plan)
        return loss

    def tune(self, inputs: Any, targets: Any = None) -> Plan:
        """Measure and plan now, with a sample batch (the first :meth:`step` otherwise does it)."""
        batch, _ = self._agree_on_batch(inputs, targets)
        self.plan = self._tuner.plan_for(batch)
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

    def _agree_on_batch(self, inputs: Any, targets: Any) -> tuple[Any, list[int]]:
        """Check the batch on every rank at once: a bad batch anywhere raises everywhere, never hangs.
        Returns the batch and every rank's number of samples."""
        try:
            batch, size = self._checked_batch(inputs, targets)
            error: Optional[BaseException] = None
        except (ValueError, TypeError, RuntimeError) as caught:
            batch, size, error = None, 0, caught
        if not self._ranks.active:
            if error is not None:
                raise error
            return batch, [size]
        settings = dict(self._settings, micro_batch=0 if self.plan is None else self.plan.micro_batch)
        table = self._ranks.gather([error is not None, size] + list(settings.values()))
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
        return batch, [int(n) for n in table[:, 1].tolist()]

    # -- one logical batch, all or nothing --------------------------------------------------------

    def _step(self, batch: Any, sizes: list[int]) -> float:
        """One logical batch, all or nothing: on error every gradient and buffer is put back.
        ``sizes``: every rank's samples; all ranks run as many micro-batches as the largest needs."""
        self._strategy.adopt(self.plan)
        count = max(math.ceil(n / self.plan.micro_batch) for n in sizes)
        splits = balanced_parts(sizes[self._ranks.rank], count)
        params = self._micro.parameters()
        saved_grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        state = BatchNormState(self._strategy.layers)
        synced = plain_sync_batch_norm(self._strategy.layers) if dist.is_available() and dist.is_initialized() \
            else contextlib.nullcontext()
        losses = Losses(self._ranks.world_size, sum(sizes), self._items)
        try:
            with ddp_state(self._micro.ddp), synced:
                loss = self._accumulate(batch, splits, state, losses)
            losses.rescale(params)
            self._micro.update(params)
        except BaseException:
            for p, grad in zip(params, saved_grads):
                p.grad = grad
            state.restore()
            raise
        for p in params:
            p.grad = None
        if losses.total is not None:
            self._items = losses.total
        return loss

    def _accumulate(self, batch: Any, splits: list[int], state: BatchNormState, losses: Losses) -> float:
        """Backward through every micro-batch; returns the logical batch's mean loss (over all ranks)."""
        norm = self._strategy.for_step(splits)
        watch = RunningStatisticsWatch(self._micro.module) if len(splits) > 1 and not self._watched else None
        batches = self._micro.batches
        batch = norm.prepare(batch, splits, state, self.plan.phase1, losses.samples)
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
                    loss = losses.add(self._micro.loss(self._micro.batches.to(part, self.device), index), size)
                mean_loss = None
                if last:
                    settled = True
                    mean_loss = self._settle(losses, splits, None, batch, norm)
                with norm.backward(first_row, size):
                    self._micro.backward(loss)
            return mean_loss
        except BaseException as error:
            if not self._ranks.active or settled:
                raise
            # The other ranks learn of it where they settle the step; then every rank raises.
            self._settle(losses, splits, error, batch, norm)
            raise

    def _gradient_sync(self, last: bool) -> ContextManager[Any]:
        """DistributedDataParallel all-reduces once per logical batch: after the last micro-batch."""
        if last or self._micro.ddp is None:
            return contextlib.nullcontext()
        return self._micro.ddp.no_sync()

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
        if raised is not None:
            if raised is not error and table[:, 4].any():
                tag(raised, Phase.LOCKSTEP)  # another rank ran out of memory there: every rank drops the lockstep
            raise raised
        return losses.settle(float(table[:, 2].sum()), float(table[:, 3].sum()))

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


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer, target_batch: int,
         loss_fn: Optional[LossFn] = None, **options: Any) -> AutoBatch:
    """Train ``model`` with logical batches of ``target_batch`` samples, in micro-batches that fit.

    Args:
        model: the module to train; it is not modified (no hooks, buffers or patches left behind).
        optimizer: the optimizer over the model's parameters; stepped once per logical batch.
        target_batch: the logical batch size of the training recipe.
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss over its micro-batch.
        compute_loss: instead of ``loss_fn``, ``compute_loss(model, micro_batch)`` for losses that
            need more than ``(outputs, targets)``; then call ``step(batch)``.
        micro_batch: samples per micro-batch, or "auto" (measured at the first step).
        bn: "two_pass" (full-batch statistics, projected backward) or "micro" (each micro-batch its
            own statistics; running statistics committed once from the pooled statistics).
        scaler, autocast_dtype, max_grad_norm: mixed precision and gradient clipping, once per step.
        before_step: called with the AutoBatch before each optimizer step (gradients unscaled, clipped).
        device: where micro-batches are computed; defaults to the model's device.
        memory_budget: cap for "auto": bytes, a string such as "6GiB", or a fraction of the device.
        cache: keep the fitted plan across launches (True: the user cache directory; or a directory;
            False: never). retune: measure afresh even when the cache has a plan.
        grow_after: after running out of memory, grow back to the fitted micro-batch after this
            many clean steps (None: stay small).
        lockstep: two_pass only: run phase 1 of the other micro-batches in a helper thread, taking
            turns with the first micro-batch's training forward, which then needs no phase 1 of its
            own (the same result; see the README's cost table before turning it on). Falls back to
            phase 1 first when it would not fit in memory.
        phase1_memory_format: two_pass's phase 1 runs its 4-D (5-D) floating-point inputs in
            ``torch.channels_last`` (3d), or as given with ``torch.preserve_format``; None (default)
            times both at the first phase 1 and keeps channels_last where it is faster and its
            statistics agree (autobatch.batchnorm.layout). The training forward is never changed.
        update_copies: where the copies that undo a failed optimizer update live: "device" (default;
            parameters plus optimizer state, at the step's lowest point, in the measured plan), "host"
            (no device memory; a device-to-host copy per step), or "none" (an error inside the update
            may leave it half applied, and is then not redone).

    Example::

        ab = autobatch.wrap(model, optimizer, target_batch=16, loss_fn=nn.CrossEntropyLoss())
        for inputs, targets in loader:
            loss = ab.step(inputs, targets)
    """
    return AutoBatch(model, optimizer, target_batch, loss_fn, **options)
