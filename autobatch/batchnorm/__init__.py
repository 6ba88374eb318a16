"""BatchNorm over a logical batch that runs as micro-batches: one strategy object per ``bn`` mode.

    strategy = strategy_for(TwoPass(), micro)      # decided once, at wrap (autobatch.modes)

Every training-mode ``F.batch_norm`` call goes to the strategy's handlers while a step runs
(autobatch.batchnorm.intercept), so nn.BatchNorm1d/2d/3d, SyncBatchNorm and subclasses that call
``F.batch_norm`` themselves (timm's BatchNormAct2d) take part without any change to the model.
"""
from __future__ import annotations

import torch

from autobatch.batchnorm.auto import AutoStrategy
from autobatch.batchnorm.exact import ExactStrategy
from autobatch.batchnorm.micro import MicroStrategy
from autobatch.batchnorm.precise import PreciseTwoPassStrategy, cannot_run_with
from autobatch.batchnorm.statistics import batch_norm_modules, batch_norm_names
from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.batchnorm.two_pass import TwoPassStrategy
from autobatch.microstep import MicroStep
from autobatch.modes import Auto, BatchNormMode, Exact, Micro, TwoPass

__all__ = ["BatchNormStrategy", "strategy_for"]


def strategy_for(mode: BatchNormMode, micro: MicroStep) -> BatchNormStrategy:
    """The strategy of ``mode`` (autobatch.modes) for ``micro``'s model: decided here and nowhere else."""
    layers, names = batch_norm_modules(micro.module), batch_norm_names(micro.module)
    if isinstance(mode, Micro):
        return MicroStrategy(layers, names, micro.ranks)
    if isinstance(mode, TwoPass):
        return _two_pass(mode, micro, layers, names)
    exact = ExactStrategy(layers, names, micro.ranks, micro)
    if isinstance(mode, Exact):
        return exact
    assert isinstance(mode, Auto), mode
    return AutoStrategy(exact, _two_pass(mode.two_pass, micro, layers, names))


def _two_pass(mode: TwoPass, micro: MicroStep, layers: list, names: dict) -> BatchNormStrategy:
    """two_pass for ``micro``'s model: precise (``mode.precise``; None: where it can run) around the projected
    two_pass, which it hands a step on to where it cannot run. A fully_shard (FSDP2) model gathers its shards in
    every forward: phase 1 runs to the end of the forward (stopping it early would leave parameters unsharded), in
    the inputs' own memory format (the format trial's forwards could end apart on the ranks). So does precise,
    which keeps every boundary of phase 1."""
    why_not = cannot_run_with(micro)
    precise = mode.precise or (mode.precise is None and why_not is None)
    memory_format = mode.phase1_memory_format
    if micro.fsdp is not None and memory_format is None:
        memory_format = torch.preserve_format
    projected = TwoPassStrategy(layers, names, micro.ranks, micro, memory_format,
                                stop_early=micro.fsdp is None and not precise)
    if precise:
        return PreciseTwoPassStrategy(projected)
    if mode.precise is None:
        projected.not_precise = why_not
    return projected
