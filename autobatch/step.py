"""The training step: one optimizer step per logical batch, accumulated over micro-batches.

    >>> ab = autobatch.wrap(model, optimizer, target_batch=16, loss_fn=criterion)
    >>> for inputs, targets in loader:        # logical batches of up to 16 samples
    ...     loss = ab.step(inputs, targets)   # float: mean loss over the logical batch
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Callable, ContextManager, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from autobatch.batchnorm import (BatchNormCall, BatchNormState, PooledBatchNorm, StopForward, TwoPassBatchNorm,
                                 batch_norm_modules, batch_norm_names, intercept_batch_norm,
                                 uses_batch_statistics)
from autobatch.bypass import RunningStatisticsWatch
from autobatch.distributed import RankFailure, Ranks, ddp_of, ddp_state, plain_sync_batch_norm
from autobatch.layout import PHASE1_FORMATS, Phase1Layout
from autobatch.lockstep import Lockstep, batch_norm_counters, thread_context
from autobatch.memory import check_memory_budget, first_line, is_out_of_memory, release_memory
from autobatch.planner import Plan, check_micro_batch, check_target_batch, fixed_plan
from autobatch.randomness import RandomDraws
from autobatch.recompute import quiet_checkpoint, recompute_with_own_statistics
from autobatch.snapshot import undone_on_error
from autobatch.split import (balanced_parts, balanced_splits, batch_size, non_finite_samples, split_batch, take,
                             to_device)
from autobatch.tuning import Tuner

__all__ = ["AutoBatch", "wrap"]

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], Tensor]
ComputeLoss = Callable[[nn.Module, Any], Tensor]
BN_MODES = ("two_pass", "micro")
#: Below this many samples per micro-batch, two_pass ended a convolutional network at 2.3x plain
#: accumulation's training loss on real data (bench/fidelity_real.py; at 4 samples it was ahead).
SMALL_MICRO_BATCH = 4


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


class AutoBatch:
    """A model and its optimizer, stepped once per logical batch of up to ``target_batch`` samples.

    Build it with :func:`wrap`. Each :meth:`step` splits the batch into balanced micro-batches,
    accumulates the gradient of the logical batch's mean loss, and takes one optimizer step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, target_batch: int,
                 loss_fn: Optional[LossFn] = None, *, compute_loss: Optional[ComputeLoss] = None,
                 micro_batch: Union[int, str] = "auto", bn: str = "two_pass",
                 scaler: Optional[torch.amp.GradScaler] = None,
                 autocast_dtype: Optional[torch.dtype] = None, max_grad_norm: Optional[float] = None,
                 before_step: Optional[Callable[["AutoBatch"], None]] = None,
                 device: Optional[Union[torch.device, str]] = None,
                 memory_budget: Union[int, float, str, None] = None,
                 cache: Union[bool, str, os.PathLike] = True, retune: bool = False,
                 grow_after: Optional[int] = None, lockstep: bool = False,
                 phase1_memory_format: Optional[torch.memory_format] = None):
        _check_arguments(model, optimizer, loss_fn, compute_loss, bn, scaler, autocast_dtype,
                         max_grad_norm, before_step, grow_after, lockstep)
        self._layout = Phase1Layout(phase1_memory_format)
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.compute_loss = compute_loss
        self.bn = bn
        self.scaler = scaler
        self.autocast_dtype = autocast_dtype
        self.max_grad_norm = max_grad_norm
        self.before_step = before_step
        self.lockstep = lockstep
        self.phase1_memory_format = phase1_memory_format
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.target_batch = check_target_batch(target_batch)
        self._ranks = Ranks.of(model)
        self._ddp = ddp_of(model)
        # The module itself: trials and phase 1 bypass DistributedDataParallel (no gradient to sync).
        self._module = model if self._ddp is None else self._ddp.module
        if target_batch % self._ranks.world_size:
            raise ValueError(
                f"target_batch={target_batch} is the logical batch over all {self._ranks.world_size} ranks and "
                f"must divide evenly among them; use a multiple of {self._ranks.world_size}")
        self._share = target_batch // self._ranks.world_size
        self._auto = check_micro_batch(micro_batch) == "auto"
        check_memory_budget(memory_budget)
        if memory_budget is not None and not self._auto:
            raise ValueError(f"memory_budget applies to micro_batch='auto'; with micro_batch={micro_batch} "
                             "drop memory_budget, or pass micro_batch='auto' to have the budget measured")
        self._tuner = Tuner(self, memory_budget, cache, retune, grow_after)
        #: None until the first step (or :meth:`tune`) measures it, when micro_batch="auto".
        self.plan: Optional[Plan] = None if self._auto else fixed_plan(
            self.target_batch, micro_batch, self._ranks.world_size).replace(lockstep=lockstep)
        self._bn_modules = batch_norm_modules(self._module)
        self._names = batch_norm_names(self._module)
        self._two_pass = TwoPassBatchNorm(self._names, self._ranks)
        #: Phase 1's dropout and stochastic-depth masks, replayed to the micro-batches (two_pass).
        self._draws = RandomDraws()
        #: Where the step is, for out-of-memory recovery: "micro-batches", "phase 1" or "lockstep".
        self._phase = "micro-batches"
        self._warned_thin = False
        #: Whether a step that splits its batch has checked that every BatchNorm went through autobatch.
        self._watched = False
        self._open = True
        if self.plan is not None:
            log.info("autobatch plan: micro_batch=%d, splits %s (given)", self.plan.micro_batch, self.plan.splits)

    # -- public -------------------------------------------------------------------------------

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
                if not (is_out_of_memory(error) and (self._auto or self._phase == "lockstep")):
                    raise
                phase, message = self._phase, first_line(error)
            release_memory(self.device)
            self._phase = "micro-batches"
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

    # -- one logical batch --------------------------------------------------------------------

    def _checked_batch(self, inputs: Any, targets: Any) -> tuple[Any, int]:
        if not self._open:
            raise RuntimeError("this AutoBatch was unwrapped; wrap the model again to keep training")
        if self.compute_loss is not None and targets is not None:
            raise TypeError("with compute_loss, pass the whole batch as one argument: step(batch)")
        batch = inputs if self.compute_loss is not None else (inputs, targets)
        size = batch_size(batch)
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
        settings = [self.target_batch, self._auto, BN_MODES.index(self.bn), len(self._bn_modules),
                    0 if self.plan is None else self.plan.micro_batch, self.lockstep,
                    PHASE1_FORMATS.index(self.phase1_memory_format)]
        table = self._ranks.gather([error is not None, size] + settings)
        failed = [rank for rank in range(self._ranks.world_size) if table[rank, 0]]
        if failed:
            messages = self._ranks.gather_messages("" if error is None else str(error))
            if error is not None:
                raise error
            raise RankFailure(f"rank {failed[0]} rejected its batch: {messages[failed[0]]}")
        for column, name in enumerate(("target_batch", "micro_batch mode", "bn", "BatchNorm layers",
                                       "micro_batch", "lockstep", "phase1_memory_format"), start=2):
            values = table[:, column].tolist()
            if len(set(values)) > 1:
                raise RankFailure(f"the ranks disagree on {name} ({values}); every rank must wrap the same "
                                  "model with the same settings")
        return batch, [int(n) for n in table[:, 1].tolist()]

    def _step(self, batch: Any, sizes: list[int]) -> float:
        """One logical batch, all or nothing: on error every gradient and buffer is put back.
        ``sizes``: every rank's samples; all ranks run as many micro-batches as the largest needs."""
        count = max(math.ceil(n / self.plan.micro_batch) for n in sizes)
        splits = balanced_parts(sizes[self._ranks.rank], count)
        self._phase = "micro-batches"
        params = self._parameters()
        saved_grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        state = BatchNormState(self._bn_modules)
        synced = plain_sync_batch_norm(self._bn_modules) if dist.is_available() and dist.is_initialized() \
            else contextlib.nullcontext()
        try:
            with ddp_state(self._ddp), synced:
                loss = self._accumulate(batch, splits, state, sum(sizes))
            self._optimizer_step(params)
        except BaseException:
            for p, grad in zip(params, saved_grads):
                p.grad = grad
            state.restore()
            raise
        for p in params:
            p.grad = None
        return loss

    def _bn_mode(self, count: int) -> str:
        if count == 1 or not uses_batch_statistics(self._bn_modules):
            return "plain"
        return self.bn

    def _accumulate(self, batch: Any, splits: list[int], state: BatchNormState, total: int) -> float:
        """Backward through every micro-batch; returns the logical batch's mean loss (over all ranks)."""
        mode = self._bn_mode(len(splits))
        watch = RunningStatisticsWatch(self._module) if len(splits) > 1 and not self._watched else None
        norm: Union[TwoPassBatchNorm, PooledBatchNorm, None] = None
        intercept: ContextManager[None] = contextlib.nullcontext()
        # Activation checkpointing calls BatchNorm again in backward: not a new forward.
        recompute: Callable[[BatchNormCall], Tensor] = recompute_with_own_statistics
        lockstep: Optional[Lockstep] = None
        if mode == "two_pass":
            batch = to_device(batch, self.device)
            self._draws.clear()
            if self.plan.lockstep and self.plan.phase1_chunks == 1:
                lockstep = self._lockstep(batch, splits[0])
            else:
                self._statistics_pass(batch, self._two_pass, state, self.plan.phase1_chunks)
                self._warn_thin_layers(splits, total)
            norm = self._two_pass
            intercept, recompute = intercept_batch_norm(norm.apply, self._bn_modules), norm.recompute
        elif mode == "micro":
            norm = PooledBatchNorm(self._names, self._ranks)
            intercept, recompute = intercept_batch_norm(norm.handle, self._bn_modules), norm.recompute
        # DistributedDataParallel averages gradients over ranks: weights make that the global mean.
        scale = self._ranks.world_size / total
        parts = split_batch(batch, [n for n in splits if n])
        weighted: list[Tensor] = []
        settled = False
        with intercept:
            for index, size in enumerate(splits):
                last = index == len(splits) - 1
                # A rank with fewer samples than micro-batches repeats one sample at weight 0.
                part = parts[index] if size else take(batch, 1)
                try:
                    first_row = sum(splits[:index])
                    if norm is not None:
                        norm.start_micro_batch(counted=size > 0, rows=(first_row, first_row + size) if size else None)
                    replay, recompute_draws = self._replay(mode, first_row, size)
                    with self._gradient_sync(last):
                        with replay:
                            if index == 0 and lockstep is not None:
                                loss = self._first_in_lockstep(lockstep, part, size * scale, splits, total)
                            else:
                                loss = self._micro_loss(to_device(part, self.device), size * scale, index)
                        if norm is not None:
                            norm.finish_micro_batch()
                        if index == 0 and (mode != "two_pass" or lockstep is not None):
                            state.mark_counted()
                        weighted.append(loss.detach())
                        if last:
                            settled = True
                            mean_loss = self._settle(weighted, splits, None, batch, norm)
                        with intercept_batch_norm(recompute, self._bn_modules), recompute_draws:
                            self._backward(loss)
                except BaseException as error:
                    if not self._ranks.active or settled:
                        raise
                    # The other ranks learn of it where they settle the step; then every rank raises.
                    settled = True
                    self._settle(weighted, splits, error, batch, norm)
        state.keep_counted()
        layers = norm.commit() if isinstance(norm, PooledBatchNorm) else norm.layers if norm is not None else []
        if watch is not None:
            watch.check({layer.name for layer in layers}, self._names)
            self._watched = True
        return mean_loss

    def _replay(self, mode: str, first_row: int, size: int) -> tuple[ContextManager[None], ContextManager[None]]:
        """The micro-batch's forward and backward with phase 1's random draws for its rows (two_pass).
        A padding micro-batch (no samples of its own, weight 0) draws afresh."""
        if mode != "two_pass" or size == 0 or not self._draws.recorded:
            return contextlib.nullcontext(), contextlib.nullcontext()
        return self._draws.replay(first_row, size), self._draws.recompute()

    def _gradient_sync(self, last: bool) -> ContextManager[Any]:
        """DistributedDataParallel all-reduces once per logical batch: after the last micro-batch."""
        if last or self._ddp is None:
            return contextlib.nullcontext()
        return self._ddp.no_sync()

    def _lockstep(self, batch: Any, first: int) -> Lockstep:
        """Phase 1 of the samples after the first micro-batch, to run alongside its training forward."""
        size = batch_size(batch)
        rest = split_batch(batch, [first, size - first])[1] if size > first else None
        # Every rank takes part, one without other samples too: the ranks decide together.
        self._measure_layout(rest, self._ranks)
        rest = self._layout.convert(rest)

        def forward_rest() -> None:
            with self._autocast(), self._draws.record(first, size - first):
                self._forward(rest)

        return Lockstep(self._two_pass, forward_rest if rest is not None else None, thread_context(self.device),
                        batch_norm_counters(self._bn_modules))

    def _first_in_lockstep(self, lockstep: Lockstep, part: Any, weight: float, splits: list[int],
                           total: int) -> Tensor:
        self._phase = "lockstep"
        with quiet_checkpoint(), lockstep:
            loss = self._micro_loss(to_device(part, self.device), weight, 0)
        self._phase = "micro-batches"
        self._warn_thin_layers(splits, total)
        return loss

    def _statistics_pass(self, batch: Any, two_pass: TwoPassBatchNorm, state: BatchNormState,
                         chunks: int, measure_layout: bool = True) -> None:
        """Phase 1: a no-grad forward of the whole batch that records every BatchNorm's statistics
        and updates running statistics once. In ``chunks`` > 1 pieces, the statistics are pooled.
        The first one (``measure_layout``) times the memory formats it may run in (autobatch.layout)."""
        self._phase = "phase 1"
        with torch.no_grad(), self._autocast(), quiet_checkpoint():
            size = batch_size(batch)
            sizes = balanced_splits(size, -(-size // chunks))
            if measure_layout:
                self._measure_layout(batch if chunks == 1 else split_batch(batch, sizes)[0], two_pass.ranks)
            batch = self._layout.convert(batch)
            if chunks == 1:
                two_pass.start_statistics_pass()
                complete = True
                with intercept_batch_norm(two_pass.record, self._bn_modules), self._draws.record(0, size):
                    try:
                        self._forward(batch)
                    except StopForward:
                        complete = False
                two_pass.finish_statistics_pass(complete)
            else:
                pooled = PooledBatchNorm(self._names, two_pass.ranks)
                with intercept_batch_norm(pooled.handle, self._bn_modules):
                    for index, chunk in enumerate(split_batch(batch, sizes)):
                        pooled.start_micro_batch()
                        with self._draws.record(sum(sizes[:index]), sizes[index]):
                            self._forward(chunk)
                        if index == 0:
                            state.mark_counted()
                state.keep_counted()
                two_pass.layers = pooled.commit()
        state.mark_counted()
        self._phase = "micro-batches"

    def _measure_layout(self, batch: Any, ranks: Ranks) -> None:
        """Phase 1's memory format, timed on ``batch`` the first time (autobatch.layout)."""
        with torch.no_grad(), self._autocast(), quiet_checkpoint():
            self._layout.measure(self._module, self._forward, batch, self.device, ranks)

    def _forward(self, batch: Any) -> None:
        if self.compute_loss is not None:
            self.compute_loss(self._module, batch)
        else:
            self._module(batch[0])

    def _warn_thin_layers(self, splits: list[int], total: int) -> None:
        if self._warned_thin:
            return
        self._warned_thin = True
        splits = [n for n in splits if n] or splits
        if min(splits) < SMALL_MICRO_BATCH:
            log.warning("two_pass with micro-batches of %d samples: its backward takes BatchNorm's subtracted "
                        "means from so few samples that a convolutional network trained to 2.3x plain "
                        "accumulation's loss on real data (a BatchNorm1d head, where plain accumulation "
                        "collapsed, trained far better; README, Results); prefer micro-batches of %d or more",
                        min(splits), SMALL_MICRO_BATCH)
        thin = self._two_pass.thin_layers(min(splits), total)
        if thin:
            listing = ", ".join(f"{name} ({values})" for name, values in thin)
            log.warning("these BatchNorm layers see few values per channel in a micro-batch: %s; two_pass "
                        "takes its backward means from one micro-batch, so their gradients are only roughly "
                        "those of the full batch. A larger micro_batch helps.", listing)

    def _micro_loss(self, part: Any, weight: float, index: int, model: Optional[nn.Module] = None) -> Tensor:
        """The micro-batch's loss times ``weight``, checked to be a scalar."""
        model = self.model if model is None else model
        with self._autocast():
            if self.compute_loss is not None:
                loss = self.compute_loss(model, part)
            else:
                loss = self.loss_fn(model(part[0]), part[1])
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"the loss for micro-batch {index} is {got}, not a scalar tensor; return the "
                             "mean loss over the micro-batch (reduction='mean')")
        return loss.reshape(()) * weight

    def _backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _settle(self, weighted: list[Tensor], splits: list[int], failure: Optional[BaseException],
                batch: Any, norm: Union[TwoPassBatchNorm, PooledBatchNorm, None]) -> float:
        """Before the last backward: every loss finite and every rank well, or all ranks raise.
        Returns the logical batch's mean loss over all ranks (one device sync per step)."""
        values = torch.stack(weighted).tolist() if weighted else []
        error = failure or self._non_finite(values, splits, batch, norm)
        if error is None and isinstance(norm, TwoPassBatchNorm):
            error = norm.check()
        if not self._ranks.active:
            if error is not None:
                raise error
            return sum(values)
        table = self._ranks.gather([error is not None, error is not None and is_out_of_memory(error),
                                    sum(values), error is not None and self._phase == "lockstep"])
        if error is None and table[:, 3].any():
            self._phase = "lockstep"  # another rank ran out of memory there: every rank drops the lockstep
        self._fail_together(table, error)
        return float(table[:, 2].sum()) / self._ranks.world_size  # the weights carry world_size

    def _fail_together(self, table: Tensor, error: Optional[BaseException]) -> None:
        """Raise on every rank if any failed (``table``'s first two columns: failed, out of memory):
        its own error where it failed, elsewhere an out-of-memory error if every failure was one
        (every rank then shrinks and redoes the same logical batch together), else RankFailure."""
        failed = [rank for rank in range(self._ranks.world_size) if table[rank, 0]]
        if not failed:
            return
        messages = self._ranks.gather_messages("" if error is None else first_line(error))
        if error is not None:
            raise error
        if all(table[rank, 1] for rank in failed):
            raise torch.OutOfMemoryError(f"rank {failed[0]} ran out of memory: {messages[failed[0]]}")
        raise RankFailure(f"rank {failed[0]} failed in this step: {messages[failed[0]]}")

    def _non_finite(self, values: list[float], splits: list[int], batch: Any,
                    norm: Union[TwoPassBatchNorm, PooledBatchNorm, None]) -> Optional[FloatingPointError]:
        for index, value in enumerate(values):
            if not math.isfinite(value):
                start = sum(splits[:index])
                where = "" if not self._ranks.active else f" on rank {self._ranks.rank}"
                # Under two_pass one sample's NaN reaches every micro-batch through phase 1's statistics.
                samples = non_finite_samples(batch)
                culprit = (f"; samples {samples} of the logical batch have NaN or infinite values in their inputs "
                           "or targets" if samples else "")
                activations = norm.non_finite_samples() if isinstance(norm, TwoPassBatchNorm) and not samples else None
                if activations is not None:
                    culprit = (f"; in phase 1, the input of BatchNorm layer {activations[0]!r} is NaN or infinite "
                               f"for samples {activations[1]} of the logical batch, and its statistics carry that "
                               "into every micro-batch")
                return FloatingPointError(
                    f"the loss of micro-batch {index}{where} (samples {start}:{start + splits[index]} of the "
                    f"logical batch) is {value}{culprit}; no optimizer step was taken and the model is unchanged. "
                    "Check the data of those samples and the learning rate")
        return None

    def _check_finite_gradient(self, params: list[nn.Parameter]) -> None:
        """A gradient that is not finite never reaches the optimizer (a GradScaler skips such steps itself)."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.scaler is not None or not grads:
            return
        # Half-precision norms in float32: a large finite fp16 gradient must not read as overflow.
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32 if g.element_size() < 4 else None)
                 .to(grads[0].device, torch.float64) for g in grads]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        if not math.isfinite(norm.item()):
            raise FloatingPointError(
                f"the accumulated gradient of the logical batch has norm {norm.item()} although every loss is "
                "finite; no optimizer step was taken and the model is unchanged. Lower the learning rate, or "
                "look for an operation whose gradient overflows")

    def _optimizer_step(self, params: list[nn.Parameter]) -> None:
        """Clip, ``before_step`` and one update, all or nothing: an error anywhere (out of memory
        half-way through the optimizer's in-place update included) leaves everything as before."""
        self._check_finite_gradient(params)
        with undone_on_error(params, self.optimizer, self.scaler):
            try:
                self._update(params)
                error: Optional[BaseException] = None
            except BaseException as caught:
                if not self._ranks.active:
                    raise
                error = caught
            if self._ranks.active:
                # A rank whose update failed is put back; so is every other, or the replicas would part.
                self._fail_together(self._ranks.gather([error is not None, error is not None and
                                                        is_out_of_memory(error)]), error)

    def _update(self, params: list[nn.Parameter]) -> None:
        if self.scaler is not None and self.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if self.before_step is not None:
            self.before_step(self)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _needs_statistics_pass(self) -> bool:
        return self.bn == "two_pass" and uses_batch_statistics(self._bn_modules)

    # -- helpers --------------------------------------------------------------------------------

    def _autocast(self) -> ContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                seen.setdefault(id(p), p)
        for p in self.model.parameters():
            seen.setdefault(id(p), p)
        return list(seen.values())


def _check_arguments(model: Any, optimizer: Any, loss_fn: Any, compute_loss: Any, bn: Any, scaler: Any,
                     autocast_dtype: Any, max_grad_norm: Any, before_step: Any, grow_after: Any,
                     lockstep: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if (loss_fn is None) == (compute_loss is None):
        raise TypeError("give exactly one of loss_fn (called as loss_fn(model(inputs), targets)) and "
                        "compute_loss (called as compute_loss(model, micro_batch))")
    for name, value in (("loss_fn", loss_fn), ("compute_loss", compute_loss), ("before_step", before_step)):
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    if bn not in BN_MODES:
        hint = (" Statistics frozen as constants (the forum's two-phase scheme) drop BatchNorm's gradient "
                "through its mean and variance and train badly; it is not offered.") if bn == "frozen" else ""
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}.{hint}")
    if scaler is not None and not hasattr(scaler, "scale"):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
        raise TypeError(f"autocast_dtype must be a torch.dtype such as torch.bfloat16, got {autocast_dtype!r}")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
    if grow_after is not None and not (isinstance(grow_after, int) and grow_after >= 1):
        raise ValueError(f"grow_after must be a positive number of steps or None, got {grow_after!r}")
    _check_optimizer_covers_model(model, optimizer)
    if not isinstance(lockstep, bool):
        raise TypeError(f"lockstep must be True or False, got {lockstep!r}")
    if lockstep and bn != "two_pass":
        raise ValueError(f"lockstep runs phase 1 of bn='two_pass' alongside the first micro-batch; bn={bn!r} "
                         "has no phase 1: drop lockstep=True")


def _check_optimizer_covers_model(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """An optimizer over other parameters trains nothing while BatchNorm statistics still move."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, p in trainable if id(p) not in stepped]
    if trainable and len(missing) == len(trainable):
        raise ValueError("the optimizer holds none of the model's parameters, so training would change nothing "
                         "but BatchNorm's running statistics; build it from this model: "
                         "optimizer = torch.optim.SGD(model.parameters(), ...)")
    if missing:
        listing = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        log.warning("%d of the model's parameters that require grad are in no optimizer param group (%s): they "
                    "get gradients but are never updated; freeze them (requires_grad_(False)) or add them to "
                    "the optimizer", len(missing), listing)


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
            statistics agree (autobatch.layout). The training forward is never changed.

    Example::

        ab = autobatch.wrap(model, optimizer, target_batch=16, loss_fn=nn.CrossEntropyLoss())
        for inputs, targets in loader:
            loss = ab.step(inputs, targets)
    """
    return AutoBatch(model, optimizer, target_batch, loss_fn, **options)
