"""BatchNorm over a logical batch that runs as micro-batches: one strategy object per ``bn`` mode.

    strategy = strategy_for(TwoPass(), micro)      # decided once, at wrap (autobatch.modes)

Every training-mode ``F.batch_norm`` call goes to the strategy's handlers while a step runs
(autobatch.batchnorm.intercept), so nn.BatchNorm1d/2d/3d, SyncBatchNorm and subclasses that call
``F.batch_norm`` themselves (timm's BatchNormAct2d) take part without any change to the model.
"""
from __future__ import annotations

from autobatch.batchnorm.auto import AutoStrategy
from autobatch.batchnorm.exact import ExactStrategy
from autobatch.batchnorm.micro import MicroStrategy
from autobatch.batchnorm.statistics import batch_norm_modules, batch_norm_names
from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.batchnorm.two_pass import TwoPassStrategy
from autobatch.microstep import MicroStep
from autobatch.modes import Auto, BatchNormMode, Exact, Micro, TwoPass

__all__ = ["BatchNormStrategy", "strategy_for"]


def strategy_for(mode: BatchNormMode, micro: MicroStep) -> BatchNormStrategy:
    """The strategy of ``mode`` (autobatch.modes) for ``micro``'s model: decided here and nowhere else."""
    layers, names = batch_norm_modules(micro.module), batch_norm_names(micro.module)
    if isinstance(mode, TwoPass):
        return TwoPassStrategy(layers, names, micro.ranks, micro, mode.phase1_memory_format)
    if isinstance(mode, Micro):
        return MicroStrategy(layers, names, micro.ranks)
    exact = ExactStrategy(layers, names, micro.ranks, micro)
    if isinstance(mode, Exact):
        return exact
    assert isinstance(mode, Auto), mode
    return AutoStrategy(exact, TwoPassStrategy(layers, names, micro.ranks, micro, mode.two_pass.phase1_memory_format))
