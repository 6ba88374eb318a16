"""One training step of the whole logical batch in one piece, under a checkpointing policy: the work
the planner measures for bn="exact" and bn="auto".

    work = whole_batch_step(micro, layers, batch, share, policy)
    peak = peak_bytes(work, device, ...)           # the policy's peak
    seconds = timed(work, device)                  # and its step time, unobserved
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from autobatch.batchnorm.exact import running_statistics_kept
from autobatch.checkpointing import Checkpointing
from autobatch.microstep import MicroStep

__all__ = ["timed", "whole_batch_step"]


def whole_batch_step(micro: MicroStep, layers: list[_BatchNorm], batch: Any, share: int,
                     policy: Checkpointing) -> Callable[[], None]:
    """A real step of this rank's ``share`` of ``batch`` in one forward and one backward, with
    ``policy``'s submodules checkpointed (on the module itself: trials wait on no other rank)."""

    def work() -> None:
        whole = micro.batches.to(micro.batches.take(batch, share), micro.device)
        with policy.applied(micro.module):
            loss = micro.loss(whole, 0, micro.module).value
            with running_statistics_kept(layers):
                micro.backward(loss)
        micro.trial_update()
        for p in micro.parameters():
            p.grad = None

    return work


def timed(work: Callable[[], None], device: torch.device) -> float:
    """Seconds ``work`` takes, the device synchronized before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
