"""The training step: one optimizer step per logical batch, accumulated over micro-batches.

    >>> ab = autobatch.wrap(model, optimizer, target_batch=16, loss_fn=criterion, micro_batch=4)
    >>> for inputs, targets in loader:        # logical batches of up to 16 samples
    ...     loss = ab.step(inputs, targets)   # float: mean loss over the logical batch
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, ContextManager, Optional, Union

import torch
from torch import Tensor, nn

from autobatch.batchnorm import (BatchNormState, PooledBatchNorm, StopForward, TwoPassBatchNorm,
                                 batch_norm_modules, batch_norm_names, intercept_batch_norm,
                                 uses_batch_statistics)
from autobatch.planner import Plan, check_micro_batch, check_target_batch, make_plan
from autobatch.split import balanced_splits, batch_size, split_batch, to_device

__all__ = ["AutoBatch", "wrap"]

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], Tensor]
ComputeLoss = Callable[[nn.Module, Any], Tensor]
BN_MODES = ("two_pass", "micro")


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
                 device: Optional[Union[torch.device, str]] = None):
        _check_arguments(model, optimizer, loss_fn, compute_loss, bn, scaler, autocast_dtype,
                         max_grad_norm, before_step)
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.compute_loss = compute_loss
        self.bn = bn
        self.scaler = scaler
        self.autocast_dtype = autocast_dtype
        self.max_grad_norm = max_grad_norm
        self.before_step = before_step
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.plan: Plan = make_plan(check_target_batch(target_batch), check_micro_batch(micro_batch))
        self._bn_modules = batch_norm_modules(model)
        self._names = batch_norm_names(model)
        self._two_pass = TwoPassBatchNorm(self._names)
        self._warned_thin = False
        self._open = True
        log.info("autobatch plan:\n%s", self.plan)

    # -- public -------------------------------------------------------------------------------

    def step(self, inputs: Any, targets: Any = None) -> float:
        """Train on one logical batch; returns its mean loss.

        With ``loss_fn``: ``step(inputs, targets)`` computes ``loss_fn(model(inputs), targets)``.
        With ``compute_loss``: ``step(batch)`` computes ``compute_loss(model, micro_batch)``.
        On any error the parameters, gradients and BatchNorm buffers are left as they were.
        """
        if not self._open:
            raise RuntimeError("this AutoBatch was unwrapped; wrap the model again to keep training")
        if self.compute_loss is not None and targets is not None:
            raise TypeError("with compute_loss, pass the whole batch as one argument: step(batch)")
        batch = inputs if self.compute_loss is not None else (inputs, targets)
        size = batch_size(batch)
        if size > self.plan.target_batch:
            raise ValueError(
                f"the batch has {size} samples but the plan holds target_batch={self.plan.target_batch}; "
                f"make the loader yield at most {self.plan.target_batch} samples, or wrap with "
                f"target_batch={size}")
        splits = balanced_splits(size, self.plan.micro_batch)
        params = self._parameters()
        saved_grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        state = BatchNormState(self._bn_modules)
        try:
            weighted = self._accumulate(batch, splits, state)
            loss = self._mean_loss(weighted, splits)
            self._optimizer_step(params)
        except BaseException:
            for p, grad in zip(params, saved_grads):
                p.grad = grad
            state.restore()
            raise
        for p in params:
            p.grad = None
        return loss

    def unwrap(self) -> nn.Module:
        """End training through autobatch and give back the model, exactly as a plain module."""
        self._open = False
        return self.model

    def __enter__(self) -> "AutoBatch":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.unwrap()

    def __repr__(self) -> str:
        return (f"AutoBatch(model={type(self.model).__name__}, target_batch={self.plan.target_batch}, "
                f"micro_batch={self.plan.micro_batch}, splits={self.plan.splits}, bn={self.bn!r})")

    # -- one logical batch --------------------------------------------------------------------

    def _bn_mode(self, count: int) -> str:
        if count == 1 or not uses_batch_statistics(self._bn_modules):
            return "plain"
        return self.bn

    def _accumulate(self, batch: Any, splits: list[int], state: BatchNormState) -> list[Tensor]:
        """Backward through every micro-batch; returns each one's loss weighted by its share."""
        mode = self._bn_mode(len(splits))
        norm: Union[TwoPassBatchNorm, PooledBatchNorm, None] = None
        intercept: ContextManager[None] = contextlib.nullcontext()
        if mode == "two_pass":
            batch = to_device(batch, self.device)
            self._statistics_pass(batch, splits)
            state.mark_counted()
            norm = self._two_pass
            intercept = intercept_batch_norm(norm.apply)
        elif mode == "micro":
            norm = PooledBatchNorm(self._names)
            intercept = intercept_batch_norm(norm.handle)
        size = sum(splits)
        weighted = []
        with intercept:
            for index, part in enumerate(split_batch(batch, splits)):
                if norm is not None:
                    norm.start_micro_batch()
                weighted.append(self._backward(to_device(part, self.device), splits[index] / size, index))
                if norm is not None:
                    norm.finish_micro_batch()
                if mode == "micro" and index == 0:
                    state.mark_counted()
        if norm is not None:
            state.keep_counted()
        if isinstance(norm, PooledBatchNorm):
            norm.commit()
        return weighted

    def _statistics_pass(self, batch: Any, splits: list[int]) -> None:
        """Phase 1: a no-grad forward of the whole batch that records every BatchNorm's statistics."""
        self._two_pass.start_statistics_pass()
        complete = True
        with torch.no_grad(), self._autocast(), intercept_batch_norm(self._two_pass.record):
            try:
                if self.compute_loss is not None:
                    self.compute_loss(self.model, batch)
                else:
                    self.model(batch[0])
            except StopForward:
                complete = False
        self._two_pass.finish_statistics_pass(complete)
        if not self._warned_thin:
            self._warned_thin = True
            thin = self._two_pass.thin_layers(min(splits), sum(splits))
            if thin:
                listing = ", ".join(f"{name} ({values})" for name, values in thin)
                log.warning("these BatchNorm layers see few values per channel in a micro-batch: %s; "
                            "two_pass takes its backward means from one micro-batch, so their gradients "
                            "are only roughly those of the full batch. A larger micro_batch helps.", listing)

    def _backward(self, part: Any, weight: float, index: int) -> Tensor:
        with self._autocast():
            if self.compute_loss is not None:
                loss = self.compute_loss(self.model, part)
            else:
                loss = self.loss_fn(self.model(part[0]), part[1])
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"the loss for micro-batch {index} is {got}, not a scalar tensor; return the "
                             "mean loss over the micro-batch (reduction='mean')")
        loss = loss.reshape(()) * weight
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach()

    def _mean_loss(self, weighted: list[Tensor], splits: list[int]) -> float:
        values = torch.stack(weighted).tolist()  # one device sync per step
        for index, value in enumerate(values):
            if not math.isfinite(value):
                start = sum(splits[:index])
                raise FloatingPointError(
                    f"the loss of micro-batch {index} (samples {start}:{start + splits[index]} of the "
                    f"logical batch) is {value / (splits[index] / sum(splits))}; no optimizer step was "
                    "taken and the model is unchanged. Check the data of those samples and the learning rate")
        return sum(values)

    def _optimizer_step(self, params: list[nn.Parameter]) -> None:
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
                     autocast_dtype: Any, max_grad_norm: Any, before_step: Any) -> None:
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
        micro_batch: samples per micro-batch, or "auto".
        bn: "two_pass" (full-batch statistics, projected backward) or "micro" (each micro-batch its
            own statistics; running statistics committed once from the pooled statistics).
        scaler, autocast_dtype, max_grad_norm: mixed precision and gradient clipping, once per step.
        before_step: called with the AutoBatch before each optimizer step (gradients unscaled, clipped).
        device: where micro-batches are computed; defaults to the model's device.

    Example::

        ab = autobatch.wrap(model, optimizer, target_batch=16, loss_fn=nn.CrossEntropyLoss())
        for inputs, targets in loader:
            loss = ab.step(inputs, targets)
    """
    return AutoBatch(model, optimizer, target_batch, loss_fn, **options)
