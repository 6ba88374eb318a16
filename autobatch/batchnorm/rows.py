"""A whole-batch tensor held as its micro-batches' rows, never allocated whole: the precise backward's gradients.

    grads = Rows(kept, device)        # kept: the whole batch's tensor the gradients are of (shape, dtype)
    grads.add(0, 4, grad_of_rows_0_to_4)
    grads.add(0, 4, more)             # rows added again are summed
    grads.of(0, 4)                    # what was added; rows never added are zeros
    grads.of(2, 6)                    # other ranges are cut from the parts that cover them

The precise backward (autobatch.batchnorm.segment_run) adds and reads the same micro-batches' rows, so a
part is handed back as it came, with no whole-batch buffer zeroed, copied into and sliced again each step.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["Rows"]


class Rows:
    """Rows ``start:stop`` of a tensor shaped as ``like``, added part by part (in its dtype) on ``device``
    (default: ``like``'s); parts added under different ranges must not overlap."""

    def __init__(self, like: Tensor, device: Optional[torch.device] = None):
        self.like = like
        self.device = like.device if device is None else device
        self.parts: dict[tuple[int, int], Tensor] = {}

    def add(self, start: int, stop: int, grad: Tensor) -> None:
        grad = grad.to(self.like.dtype)
        old = self.parts.get((start, stop))
        self.parts[start, stop] = grad if old is None else old + grad

    def of(self, start: int, stop: int) -> Tensor:
        part = self.parts.get((start, stop))
        if part is not None:
            return part
        pieces, row = [], start
        for (first, last), value in sorted(self.parts.items()):
            if last <= row or first >= stop:
                continue
            if first > row:
                pieces.append(self._zeros(first - row))
            pieces.append(value[max(row, first) - first:min(stop, last) - first])
            row = min(stop, last)
        if row < stop:
            pieces.append(self._zeros(stop - row))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _zeros(self, rows: int) -> Tensor:
        return torch.zeros((rows,) + tuple(self.like.shape[1:]), dtype=self.like.dtype, device=self.device)
