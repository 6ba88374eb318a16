"""The training step: one optimizer step per logical batch, accumulated over micro-batches.

    >>> ab = autobatch.wrap(model, optimizer, target_batch=16, loss_fn=criterion)
    >>> for inputs, targets in loader:        # logical batches of up to 16 samples
    ...     loss = ab.step(inputs, targets)   # float: mean loss over the logical batch

A step agrees on the batch with the other ranks (autobatch.agreement), plans (first step only), then
runs the logical batch as one transaction (autobatch.logical_step). Any exception puts everything back;
out of memory redoes the same batch under a smaller plan.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from autobatch.agreement import Planned, StepShape, agree_on_batch
from autobatch.batchnorm import BatchNormStrategy, strategy_for
from autobatch.distributed import Ranks, check_not_legacy_fsdp
from autobatch.logical_step import InputsTargets, LogicalStep
from autobatch.microstep import ComputeLoss, LossFn, MicroStep
from autobatch.modes import BatchNormMode
from autobatch.oom import first_line, is_out_of_memory, release_memory
from autobatch.options import MicroBatch, Options, UpdateCopies
from autobatch.plan import Plan
from autobatch.planning.planner import Ran, RanOutOfMemory, planner_for
from autobatch.stages import Stage, stage_of
from autobatch.transaction import ThreadContexts, Transaction

__all__ = ["AutoBatch", "wrap"]

log = logging.getLogger(__name__)


class AutoBatch:
    """A model and its optimizer, stepped once per logical batch of up to ``target_batch`` samples.

    Build it with `wrap`. Each `step` splits the batch into balanced micro-batches,
    accumulates the gradient of the logical batch's loss, and takes one optimizer step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, options: Options):
        self.model, self.optimizer, self.options = model, optimizer, options
        hook = options.before_step
        self._micro = MicroStep(model, optimizer, options, None if hook is None else lambda: hook(self))
        self._strategy: BatchNormStrategy = strategy_for(options.bn, self._micro)
        self.device, self._ranks = self._micro.device, self._micro.ranks
        self.target_batch = options.target_batch
        #: The plan's one owner: measured (micro_batch="auto") or the size given (autobatch.planning.planner).
        self._planner = planner_for(self._micro, self._strategy, options)
        self._open = True
        #: Count-weighted losses: the items of the last logical batch (autobatch.loss).
        self._items: Optional[float] = None

    @property
    def plan(self) -> Optional[Plan]:
        """The `Plan` the steps run: the micro-batch, the splits, the gradient they compute, and why; with
        micro_batch="auto", None until the first `step` (or `tune`) measures it, then the plan of the last
        batch's sample size."""
        plan = self._planner.state.plan
        return None if plan is None else plan.replace(gradient=self._strategy.gradient_of(plan),
                                                      update_copy_bytes=self._micro.undo_copy_bytes())

    @plan.setter
    def plan(self, plan: Optional[Plan]) -> None:
        # A plan set by hand (tests, benchmarks: another checkpointing policy) is the planner's from then on.
        self._planner.state.plan = plan

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
        # ``options`` says what the wrap runs: it follows, so that the two never disagree.
        self.options = dataclasses.replace(self.options, loss_fn=loss_fn)
        self._micro.loss_fn = loss_fn

    def step(self, inputs: Any, targets: Any = None) -> float:
        """Train on one logical batch; returns its mean loss.

        With ``loss_fn``: ``step(inputs, targets)`` computes ``loss_fn(model(inputs), targets)``.
        With ``compute_loss``: ``step(batch)`` computes ``compute_loss(model, micro_batch)``.
        On any error the parameters, gradients, optimizer state, BatchNorm buffers, the RNG and the
        plan are left as they were. With micro_batch="auto", running out of memory shrinks the
        micro-batch and redoes the same batch.
        """
        return self._logical_batch(inputs, targets, update=True)

    def backward(self, inputs: Any, targets: Any = None) -> float:
        """The logical batch's gradient, with no optimizer step: for a loop or trainer that takes the step
        itself. Returns the batch's mean loss.

        What `step` would hand the optimizer, planned, split and accumulated the same way (every
        ``bn`` mode, count-weighted losses, reduced once over ranks), is added to the parameters' ``.grad``
        as ``loss.backward()`` adds to it; with ``scaler`` it is scaled, as ``scaler.scale(loss).backward()``
        leaves it, for the caller's ``scaler.unscale_``/``scaler.step``. All or nothing: on any error the
        gradients, BatchNorm buffers, the RNG and the plan are as before the call.

        Example:
            ```python
            loss = ab.backward(inputs, targets)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            ```
        """
        return self._logical_batch(inputs, targets, update=False)

    def _logical_batch(self, inputs: Any, targets: Any, update: bool) -> float:
        with Transaction(kept=self._planner.state.snapshot, contexts=ThreadContexts):
            batch, sizes, planned = self._agree_on_batch(inputs, targets)
            return self._until_it_fits(batch, sizes, planned, update)

    def tune(self, inputs: Any, targets: Any = None) -> Plan:
        """Measure and plan now, with a sample batch (the first `step` otherwise does it); later, a
        batch of another sample size is measured by trials, as its first step would measure itself."""
        batch, sizes, _ = self._agree_on_batch(inputs, targets)
        self._planner.tune(batch)
        self._planned(batch, sizes)
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
        plan = self._planner.state.plan
        micro = plan.micro_batch if plan is not None else "auto (not measured yet)"
        return (f"AutoBatch(model={type(self.model).__name__}, target_batch={self.target_batch}, "
                f"micro_batch={micro}, bn={self.bn!r})")

    # -- one logical batch, again under a smaller plan while it runs out of memory ----------------

    def _until_it_fits(self, batch: Any, sizes: list[int], planned: Optional[Planned], update: bool) -> float:
        while True:
            if planned is None:
                planned = self._planned(batch, sizes)
            step = LogicalStep(self._micro, self._strategy, planned.plan, batch, sizes, planned.count,
                               planned.measure, self._items)
            try:
                loss = step.run(update)
                break
            except BaseException as error:
                stage = stage_of(error)
                # Out of memory in the update is not redone: the update was taken again alone already
                # (autobatch.microstep). Elsewhere the planner decides (a fixed micro_batch never redoes).
                if not is_out_of_memory(error) or stage is Stage.UPDATE or \
                        not self._planner.went(RanOutOfMemory(planned.plan, stage, first_line(error))):
                    raise
            del step
            release_memory(self.device)
            planned = None
        self._planner.went(Ran(planned.plan, max(step.splits), step.meter, planned.measure))
        if step.losses.total is not None:
            self._items = step.losses.total
        return loss

    def _planned(self, batch: Any, sizes: list[int]) -> Planned:
        """The plan every rank runs for ``batch``, agreed with the other ranks (one all-gather)."""
        plan, measure = self._planner.next(batch)
        size = sizes[self._ranks.rank]
        _, shape = agree_on_batch(self._ranks, None, size, {}, StepShape.of(plan, size))
        return Planned.agreed(plan, measure, shape)

    # -- the batch, agreed over ranks -----------------------------------------------------------

    def _checked_batch(self, inputs: Any, targets: Any) -> tuple[Any, int]:
        if not self._open:
            raise RuntimeError("this AutoBatch was unwrapped; wrap the model again to keep training")
        if self._micro.compute_loss is not None and targets is not None:
            raise TypeError("with compute_loss, pass the whole batch as one argument: step(batch)")
        batch = inputs if self._micro.compute_loss is not None else InputsTargets(inputs, targets)
        size, share = self._micro.batches.size(batch), self._micro.share
        if size > share:
            where = "" if self._ranks.world_size == 1 else f" on each of {self._ranks.world_size} ranks"
            raise ValueError(
                f"the batch has {size} samples but the plan holds {share}{where} (target_batch="
                f"{self.target_batch}); make the loader yield at most {share} samples, or wrap with a "
                "larger target_batch")
        return batch, size

    def _agree_on_batch(self, inputs: Any, targets: Any) -> tuple[Any, list[int], Optional[Planned]]:
        """Check the batch on every rank at once: a bad batch anywhere raises everywhere, never hangs.
        Returns the batch, every rank's number of samples, and (once a plan exists) the step agreed: the
        one all-gather carries each rank's plan for its batch too."""
        shape: Optional[StepShape] = None
        plan, measure = None, False
        try:
            batch, size = self._checked_batch(inputs, targets)
            error: Optional[BaseException] = None
            if self._planner.state.plan is not None:
                plan, measure = self._planner.next(batch)
                shape = StepShape.of(plan, size)
        except (ValueError, TypeError, RuntimeError) as caught:
            batch, size, error = None, 0, caught
        # Every rank must wrap the same way: what the options declare agreed.
        settings = dict(self.options.agreed(), **{"BatchNorm layers": len(self._strategy.layers)})
        sizes, shape = agree_on_batch(self._ranks, error, size, settings if self._ranks.active else {}, shape)
        return batch, sizes, None if shape is None else Planned.agreed(plan, measure, shape)


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer, target_batch: int, loss_fn: Optional[LossFn] = None,
         *, compute_loss: Optional[ComputeLoss] = None, micro_batch: MicroBatch = "auto",
         bn: Union[str, BatchNormMode] = "auto", memory_budget: Union[int, float, str, None] = None,
         cache: Union[bool, str, os.PathLike] = True, scaler: Optional[torch.amp.GradScaler] = None,
         autocast_dtype: Optional[torch.dtype] = None, max_grad_norm: Optional[float] = None,
         before_step: Optional[Callable[[AutoBatch], None]] = None, device: Union[torch.device, str, None] = None,
         grow_after: Optional[int] = None, update_copies: UpdateCopies = "device",
         num_samples: Optional[Callable[[Any], int]] = None,
         split_batch: Optional[Callable[[Any, list[int]], Any]] = None, **moved: Any) -> AutoBatch:
    """Train ``model`` with logical batches of ``target_batch`` samples, in micro-batches that fit.

    Args:
        model: the module to train (a DistributedDataParallel one under DDP); it is not modified: no
            hooks, buffers or patches are left behind, and its ``state_dict`` is the plain model's.
        optimizer: the optimizer over the model's parameters; stepped once per logical batch.
        target_batch: the logical batch size of the training recipe, over all ranks. A shorter batch
            (the last of an epoch) is fine, a larger one is an error.
        loss_fn: ``loss_fn(model(inputs), targets)``, called per micro-batch; returns the micro-batch's mean
            loss, or ``(loss_sum, count)``: its loss summed over ``count`` items (valid tokens, labelled pixels).
        compute_loss: instead of ``loss_fn``, ``compute_loss(model, micro_batch)`` for losses that need
            more than ``(outputs, targets)``; then call ``step(batch)``. Returns as ``loss_fn`` does.
        micro_batch: samples per micro-batch (an int), or "auto" (default): the largest that fits,
            measured with real steps at the first step.
        bn: how BatchNorm layers see the logical batch: "auto" (default; `Auto`: the full batch's exact
            gradient, as the whole batch where it fits, else two_pass with its precise backward), "two_pass"
            (`TwoPass`), "micro" (`Micro`) or "exact" (`Exact`), or one of those with its settings, such as
            ``autobatch.TwoPass(precise=True)``. With an int ``micro_batch``, "auto" is two_pass (precise
            where it can run) at that size.
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
        update_copies: where the undo copies of a failed update live: "device", "host" or "none" (no undo).
        num_samples: for a batch type of your own (with ``split_batch``): ``num_samples(batch)`` counts it.
        split_batch: ``split_batch(batch, sizes)`` cuts it into ``len(sizes)`` batches of those sizes.
        **moved: the keywords of earlier versions: ``phase1_memory_format=`` and ``retune=`` warn and still
            work; ``lockstep=`` was removed and raises a TypeError that says so.

    Returns:
        The ``AutoBatch`` to train with: ``ab.step(inputs, targets)`` per logical batch.

    Example:
        ```python
        ab = autobatch.wrap(model, optimizer, target_batch=16, loss_fn=nn.CrossEntropyLoss())
        for inputs, targets in loader:
            loss = ab.step(inputs, targets)
        ```
    """
    check_not_legacy_fsdp(model)
    options = Options.build(
        model, optimizer, target_batch, Ranks.of(model).world_size, loss_fn=loss_fn, compute_loss=compute_loss,
        micro_batch=micro_batch, bn=bn, scaler=scaler, autocast_dtype=autocast_dtype, max_grad_norm=max_grad_norm,
        before_step=before_step, device=device, memory_budget=memory_budget, cache=cache, grow_after=grow_after,
        update_copies=update_copies, num_samples=num_samples, split_batch=split_batch, **moved)
    return AutoBatch(model, optimizer, options)
