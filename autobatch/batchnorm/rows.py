"""A whole-batch tensor held as its micro-batches' rows, never allocated whole: the precise backward's gradients.

    grads = Rows(kept, device)        # kept: the whole batch's tensor the gradients are of (shape, dtype)
    grads.add(0, 4, grad_of_rows_0_to_4)
    grads.add(0, 4, more)             # rows added again are summed
    grads.of(0, 4)                    # what was added; rows never added are zeros
    grads.of(2, 6)                    # other ranges are cut from the parts that cover them

The precise backward (autobatch.batchnorm.segment_run) adds and reads the same micro-batches' rows, so a
part is handed back as it came, with no whole-batch buffer zeroed, copied into and sliced again each step.

Ranges count samples. A tensor may hold several rows per sample, samples first (``rows_per_sample``): a
BatchNorm1d over a transformer's tokens flattened into the first dimension (timm's LeViT), or a video's frames
folded into it, ``x.view(samples * frames, C, H, W)``; samples ``start:stop`` are then its rows
``start * k:stop * k``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["Rows", "rows_per_sample"]


def rows_per_sample(size: int, samples: int) -> Optional[int]:
    """How many rows of a first dimension of ``size`` each of ``samples`` samples holds: 1 for a tensor of the
    samples, k for k rows per sample (samples first, as ``flatten(0, 1)`` of a (samples, k, ...) tensor
    lays them out); None where ``size`` is no whole multiple of ``samples``."""
    per_sample, left = divmod(size, samples) if samples > 0 else (0, 1)
    return per_sample if per_sample and not left else None


class Rows:
    """Samples ``start:stop`` of a tensor shaped as ``like``, added part by part (in its dtype) on ``device``
    (default: ``like``'s), ``per_sample`` rows each; parts whose ranges overlap are summed into one."""

    def __init__(self, like: Tensor, device: Optional[torch.device] = None, per_sample: int = 1):
        self.like = like
        self.device = like.device if device is None else device
        self.per_sample = per_sample
        self.parts: dict[tuple[int, int], Tensor] = {}

    def add(self, start: int, stop: int, grad: Tensor) -> None:
        grad = grad.to(self.like.dtype)
        old = self.parts.get((start, stop))
        if old is not None:
            self.parts[start, stop] = old + grad
            return
        overlapping = [(first, last) for first, last in self.parts if first < stop and start < last]
        if not overlapping:
            self.parts[start, stop] = grad
            return
        # Other ranges (the micro-batches' output gradients beside a whole segment's): one part for all of them.
        low, high = min([start] + [first for first, _ in overlapping]), max([stop] + [last for _, last in overlapping])
        merged = self.of(low, high).clone()
        for part in overlapping:
            del self.parts[part]
        merged[(start - low) * self.per_sample:(stop - low) * self.per_sample] += grad
        self.parts[low, high] = merged

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
            k = self.per_sample
            pieces.append(value[(max(row, first) - first) * k:(min(stop, last) - first) * k])
            row = min(stop, last)
        if row < stop:
            pieces.append(self._zeros(stop - row))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _zeros(self, samples: int) -> Tensor:
        return torch.zeros((samples * self.per_sample,) + tuple(self.like.shape[1:]), dtype=self.like.dtype,
                           device=self.device)
