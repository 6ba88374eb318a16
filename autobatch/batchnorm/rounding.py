"""How far a model's own rounding moves its BatchNorm inputs, measured against a float64 forward.

two_pass checks that each micro-batch feeds every BatchNorm what phase 1 measured for the same samples
(autobatch.batchnorm.full_batch). In float32 or under autocast the two forwards round apart (another
batch size, another kernel), and a deep network carries the difference along: timm efficientnet_b0
in float32 reached 0.04 standard deviations at its 13th block, where a fixed allowance of 0.02 ended
the run. When the check fails, this measures the rounding itself before anything is refused::

    rounding = measured_rounding(micro, part, layers, replay)   # per BatchNorm call, in standard deviations
    allowed = [ROUNDING_MARGIN * r for r in rounding]           # autobatch.batchnorm.full_batch

The micro-batch's rows run twice with no gradient, normalized with phase 1's statistics as the step
normalizes them: as the step runs them, and in float64 on a copy of the model, both from the same
generator state. Their difference at each BatchNorm is rounding alone (the same samples, the same
statistics, the same random draws), so a random operation that was not replayed, or a layer that
mixes samples, is not excused by it.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor

from autobatch.batchnorm.intercept import BatchNormCall, intercept_batch_norm
from autobatch.batchnorm.statistics import LayerStatistics, channel_means
from autobatch.forward import forward_replaced
from autobatch.microstep import MicroStep
from autobatch.split import map_tensors
from autobatch.transaction import RandomState

__all__ = ["measured_rounding"]


def _input_means(micro: MicroStep, part: Any, layers: list[LayerStatistics], low_precision: bool) -> list[Tensor]:
    """Each BatchNorm call's per-channel input mean (float64) in one no-grad forward of ``part``, every call
    normalized with phase 1's statistics."""
    seen: list[Tensor] = []

    def normalize(call: BatchNormCall) -> Tensor:
        layer = layers[len(seen)]
        seen.append(channel_means(call.input.detach(), torch.float64))
        dtype = call.input.dtype
        return torch.batch_norm(call.input, call.weight, call.bias, layer.mean.to(dtype), layer.var.to(dtype), False,
                                0.0, layer.eps, False)

    with torch.no_grad(), intercept_batch_norm(normalize), \
            (micro.autocast() if low_precision else torch.autocast(micro.device.type, enabled=False)):
        micro.forward(part)
    return seen


def measured_rounding(micro: MicroStep, part: Any, layers: list[LayerStatistics],
                      replay: Callable[[], ContextManager[None]]) -> list[float]:
    """Per BatchNorm call, how far the step's forward of ``part`` puts its input mean from a float64
    forward's, in the full batch's standard deviations. ``replay``: phase 1's random draws for ``part``."""
    # Both forwards start from the same generator state, and it is put back after them: a random operation that
    # is not replayed draws alike in both, so that it shows as the mismatch it is, not as rounding.
    random = RandomState()
    try:
        with replay():
            low = _input_means(micro, part, layers, low_precision=True)
        random.restore()
        exact = copy.deepcopy(micro.module).double()
        wide = map_tensors(part, lambda leaf: leaf.double() if leaf.is_floating_point() else leaf)
        with replay(), forward_replaced(micro.module, exact.forward):
            high = _input_means(micro, wide, layers, low_precision=False)
    finally:
        random.restore()
    return [float(((a - b).abs() * layer.invstd.double()).amax()) for a, b, layer in zip(low, high, layers)]
