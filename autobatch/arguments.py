"""Checks of ``wrap``'s arguments, made before anything changes: each error names the problem and the fix."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from autobatch.planning.planner import check_target_batch
from autobatch.snapshot import UPDATE_COPIES

__all__ = ["check_arguments", "share_of"]

log = logging.getLogger(__name__)


def check_arguments(model: Any, optimizer: Any, loss_fn: Any, compute_loss: Any, scaler: Any,
                    autocast_dtype: Any, max_grad_norm: Any, before_step: Any, grow_after: Any,
                    update_copies: Any = "device") -> None:
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
    if scaler is not None and not hasattr(scaler, "scale"):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
        raise TypeError(f"autocast_dtype must be a torch.dtype such as torch.bfloat16, got {autocast_dtype!r}")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
    if grow_after is not None and not (isinstance(grow_after, int) and grow_after >= 1):
        raise ValueError(f"grow_after must be a positive number of steps or None, got {grow_after!r}")
    if update_copies not in UPDATE_COPIES:
        raise ValueError(f"update_copies must be one of {UPDATE_COPIES}, got {update_copies!r}")
    _check_optimizer_covers_model(model, optimizer)


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


def share_of(target_batch: Any, world_size: int) -> int:
    """Each rank's share of the logical batch ``target_batch`` (over all ``world_size`` ranks)."""
    check_target_batch(target_batch)
    if target_batch % world_size:
        raise ValueError(f"target_batch={target_batch} is the logical batch over all {world_size} ranks and must "
                         f"divide evenly among them; use a multiple of {world_size}")
    return target_batch // world_size
