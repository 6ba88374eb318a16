"""BatchNorm over a logical batch that runs as micro-batches: one strategy object per ``bn`` mode.

    strategy = strategy_for("two_pass", micro, phase1_memory_format=None)   # decided once, at wrap

Every training-mode ``F.batch_norm`` call goes to the strategy's handlers while a step runs
(autobatch.batchnorm.intercept), so nn.BatchNorm1d/2d/3d, SyncBatchNorm and subclasses that call
``F.batch_norm`` themselves (timm's BatchNormAct2d) take part without any change to the model.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch

from autobatch.batchnorm.auto import Auto
from autobatch.batchnorm.exact import Exact
from autobatch.batchnorm.micro import Micro
from autobatch.batchnorm.statistics import batch_norm_modules, batch_norm_names
from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.batchnorm.two_pass import TwoPass
from autobatch.microstep import MicroStep

__all__ = ["BN_MODES", "BatchNormMode", "BatchNormStrategy", "strategy_for"]

BatchNormMode = Literal["two_pass", "micro", "exact", "auto"]
#: The ``bn`` values ``wrap`` accepts, in the order the ranks compare them by.
BN_MODES: tuple[BatchNormMode, ...] = ("two_pass", "micro", "exact", "auto")


def strategy_for(bn: BatchNormMode, micro: MicroStep, lockstep: bool = False,
                 phase1_memory_format: Optional[torch.memory_format] = None) -> BatchNormStrategy:
    """The strategy of mode ``bn`` for ``micro``'s model, checked here and nowhere else.
    ``lockstep`` (phase 1 alongside the first micro-batch) is two_pass's only."""
    if bn not in BN_MODES:
        hint = (" Statistics frozen as constants (the forum's two-phase scheme) drop BatchNorm's gradient "
                "through its mean and variance and train badly; it is not offered.") if bn == "frozen" else ""
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}.{hint}")
    if not isinstance(lockstep, bool):
        raise TypeError(f"lockstep must be True or False, got {lockstep!r}")
    if lockstep and bn != "two_pass":
        raise ValueError(f"lockstep runs phase 1 of bn='two_pass' alongside the first micro-batch; bn={bn!r} "
                         "has no phase 1 of its own to run alongside: drop lockstep=True")
    layers, names = batch_norm_modules(micro.module), batch_norm_names(micro.module)
    if bn == "two_pass":
        return TwoPass(layers, names, micro.ranks, micro, phase1_memory_format)
    if bn == "micro":
        return Micro(layers, names, micro.ranks)
    exact = Exact(layers, names, micro.ranks, micro)
    if bn == "exact":
        return exact
    return Auto(exact, TwoPass(layers, names, micro.ranks, micro, phase1_memory_format))
