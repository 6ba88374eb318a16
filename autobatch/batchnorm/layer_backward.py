"""One BatchNorm layer's backward over the whole logical batch, from the output gradients of its
micro-batches: what the precise backward (autobatch.batchnorm.segment_run) runs at each cut.

    backward = LayerBackward(x, statistics, weight)    # x: phase 1's input of the layer, whole batch
    backward.add(0, 4, grad_rows_0_to_4)               # each micro-batch's gradient at the layer's output
    backward.add(4, 8, grad_rows_4_to_8)
    backward.parameter_grads()                         # (weight's, bias's): the sums, over the whole batch
    backward.over_ranks(ranks.sum)                     # several processes: the sums over every rank's rows
    backward.input_grad(0, 4)                          # the input's gradient, rows at a time

Beside autobatch.batchnorm.full_batch, whose forward it differentiates: the same statistics, and
the gradient ``nn.BatchNorm`` would give the whole batch in one piece.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from autobatch.batchnorm.rows import Rows
from autobatch.batchnorm.statistics import LayerStatistics

__all__ = ["LayerBackward"]


class LayerBackward:
    """One BatchNorm's backward over the whole batch from every micro-batch's output gradient.

    NOTE [the BatchNorm backward over the whole batch]
    With ``xhat = (x - mean) * invstd`` and ``y = weight * xhat + bias`` over N values per channel, the
    gradient of the input is::

        dx = weight * invstd * (g - mean(g) - xhat * mean(g * xhat))     # g = dL/dy; means over all N

    Both means run over the whole batch, so no row's ``dx`` is known before every micro-batch's ``g`` has
    come in. `add` keeps ``g`` and the two per-channel sums ``sum(g)`` and ``sum(g * xhat)``, which are the
    bias's and the weight's gradients (`parameter_grads`): PyTorch's own BatchNorm backward takes them in one
    pass over the rows, in its eval form, with the whole batch's mean and variance as the running ones.
    `input_grad` then gives any rows' ``dx`` from ``mean(g) = sum(g) / N`` and ``mean(g * xhat)``.

    A worked example: one channel, weight 1, x = [0, 2, 4, 6] (mean 3, invstd 1/sqrt(5)) in two
    micro-batches of 2, and g = [1, 0 | 0, 0]. The sums: sum(g) = 1, sum(g * xhat) = -3 / sqrt(5), so
    mean(g) = 1/4 and mean(g * xhat) = -3 / (4 sqrt(5)). Then sqrt(5) * dx = [0.3, -0.4, -0.1, 0.2], as
    ``F.batch_norm``'s own backward gives the four rows at once. Taking the means over each micro-batch
    alone (two_pass's projected backward) gives [-0.4, -0.8, 0, 0]: row 0's sign flips, and the second
    micro-batch, whose own g is zero, gets no gradient at all.
    """

    def __init__(self, x: Tensor, layer: LayerStatistics, weight: Optional[Tensor],
                 rows: Optional[Callable[[int, int], Tensor]] = None, per_sample: int = 1):
        """``x``: the layer's input over the whole batch, ``per_sample`` rows per sample (autobatch.batchnorm.rows);
        ``rows(start, stop)``: samples ``start:stop`` of it where they compute (x kept in host memory), default
        ``x``'s rows ``start * per_sample:stop * per_sample``. Ranges below count samples."""
        self.x, self.layer, self.weight = x, layer, weight
        self._x_rows = rows or (lambda start, stop: x[start * per_sample:stop * per_sample])
        self.shape = (1, -1) + (1,) * (x.dim() - 2)
        self.dims = [0] + list(range(2, x.dim()))
        self.g = Rows(x, layer.mean.device, per_sample)
        self.sum_dy = torch.zeros_like(layer.mean)
        self.sum_dy_xhat = torch.zeros_like(layer.mean)
        #: The sums the input's gradient takes its means from: this process's, or every rank's (`over_ranks`).
        self._sums = (self.sum_dy, self.sum_dy_xhat)
        self._coefficients: Optional[tuple[Tensor, Tensor, Tensor]] = None

    def _centred(self, start: int, stop: int) -> Tensor:
        return self._x_rows(start, stop).to(self.layer.mean.dtype) - self.layer.mean.view(self.shape)

    def add(self, start: int, stop: int, grad: Optional[Tensor]) -> None:
        """Rows ``start:stop``'s gradient at the layer's output (None: the micro-batch sent none back)."""
        if grad is None:
            return
        self.g.add(start, stop, grad)
        layer, dtype = self.layer, self.layer.mean.dtype
        # Eval mode: ``sum(g * (x - mean) * invstd)`` and ``sum(g)`` with the given statistics, nothing subtracted.
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad.to(dtype), self._x_rows(start, stop).to(dtype), None, layer.mean, layer.var, None, None, False,
            layer.eps, [False, True, True])
        self.sum_dy += sum_dy
        self.sum_dy_xhat += sum_dy_xhat

    def parameter_grads(self) -> tuple[Tensor, Tensor]:
        """The weight's and the bias's gradients from this process's rows, once every micro-batch was added
        (several processes: DDP averages them over the ranks, as SyncBatchNorm's)."""
        return self.sum_dy_xhat, self.sum_dy

    def over_ranks(self, total: Callable[[Tensor], Tensor]) -> None:
        """The two sums over every rank's rows (``total``: a sum over the ranks, one collective), for the input's
        gradient: its means run over the whole logical batch, as SyncBatchNorm's backward all-reduces them."""
        summed = total(torch.stack([self.sum_dy, self.sum_dy_xhat]))
        self._sums = (summed[0], summed[1])
        self._coefficients = None

    def input_grad(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of the input's gradient, once every micro-batch was added."""
        scale, slope, shift = self._input_coefficients()
        grad = self._centred(start, stop)
        # weight * invstd * (g - mean(g) - xhat * mean(g * xhat)) as shift + slope * (x - mean) + scale * g: two
        # passes over the rows after centring them (x - mean kept apart, as PyTorch's own backward keeps it).
        torch.addcmul(shift, grad, slope, out=grad)
        return grad.addcmul_(self.g.of(start, stop).to(scale.dtype), scale).to(self.x.dtype)

    def _input_coefficients(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per channel, shaped to broadcast over the rows: ``weight * invstd``, what multiplies ``x - mean`` and
        the constant; from the final sums, so taken once."""
        if self._coefficients is None:
            mean_dy, mean_dy_xhat = (total / self.layer.values_per_channel for total in self._sums)
            invstd = self.layer.invstd
            scale = invstd if self.weight is None else invstd * self.weight.detach().to(invstd.dtype)
            self._coefficients = (scale.view(self.shape), (-scale * invstd * mean_dy_xhat).view(self.shape),
                                  (-scale * mean_dy).view(self.shape))
        return self._coefficients
