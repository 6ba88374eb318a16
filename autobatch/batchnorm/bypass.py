"""Layers whose running statistics change without a call to ``F.batch_norm``, which autobatch cannot see.

A TorchScript module, or a BatchNorm subclass whose forward computes its own statistics, updates its
running statistics once per micro-batch and normalizes with the micro-batch's statistics: nothing
autobatch promises holds for it, so the first step that splits a batch checks for them::

    watch = RunningStatisticsWatch(model)
    ...                                     # the step's forwards and backwards
    watch.check(handled, names)             # raises, naming every layer that changed unseen
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["RunningStatisticsWatch"]


class RunningStatisticsWatch:
    """Every layer with a ``running_mean`` buffer (TorchScript submodules' too), and its buffers now."""

    def __init__(self, model: nn.Module):
        #: Each layer's buffers by their names, with their values now.
        self._layers: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
        for name, module in model.named_modules():
            if isinstance(module, _InstanceNorm):
                continue  # it normalizes each sample alone: splitting the batch cannot change its outputs
            own = dict(module.named_buffers(recurse=False))
            if own.get("running_mean") is not None:
                self._layers[name or type(model).__name__] = {
                    key: (buffer, buffer.detach().clone()) for key, buffer in own.items() if buffer is not None}

    @torch.no_grad()
    def check(self, handled: set[str], names: dict[int, str]) -> None:
        """Raise if a running mean changed whose layer is not among the ``handled`` names (``names``:
        a BatchNorm buffer's id to its layer's name, as the handlers record it), after putting that
        layer's buffers back."""
        unseen = {}
        for layer, own in self._layers.items():
            mean, before = own["running_mean"]
            if names.get(id(mean)) not in handled and not mean.equal(before):
                unseen[layer] = own
        if not unseen:
            return
        for buffer, value in (pair for own in unseen.values() for pair in own.values()):
            buffer.copy_(value)
        raise RuntimeError(
            f"layer{'s' if len(unseen) > 1 else ''} {', '.join(map(repr, unseen))} changed running statistics "
            "without calling torch.nn.functional.batch_norm: autobatch cannot normalize them with the logical "
            "batch's statistics, and every micro-batch would update them again (a TorchScript module, or a "
            "BatchNorm whose forward computes its own statistics). Pass the model as Python modules "
            "(torch.compile works), or make these layers call F.batch_norm; the step was undone")

