"""Phase 1 of two_pass for the other micro-batches, in lockstep with the first micro-batch's training forward.

Phase 1 is a no-grad forward of the whole logical batch. The first micro-batch's samples need not
go through it separately: a helper thread runs phase 1 over the *other* samples while the caller
runs the first micro-batch's training forward, and the two meet at every BatchNorm call, where the
full batch's statistics are merged from both halves. The threads take turns, never both at once;
the saving is the first micro-batch's share of phase 1, and the result is that of phase 1 first.

Opt-in (``wrap(..., lockstep=True)``): on a 2-core CPU it measured slower than phase 1 first
(bench/results/cost.md), since every thread that runs PyTorch CPU ops brings its own OpenMP team::

    lockstep = Lockstep(statistics, rest=lambda: module(other_samples), context=thread_context(device),
                        counters=batch_norm_counters(bn_layers))
    with lockstep:                               # the caller's training forward of micro-batch 0
        loss = loss_fn(model(first_samples), first_targets)
    loss.backward()                              # statistics.layers holds the full-batch statistics
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from autobatch.batchnorm.full_batch import FullBatchStatistics, StopForward, check_same_channels, different_calls
from autobatch.batchnorm.intercept import BatchNormCall, intercept_batch_norm
from autobatch.batchnorm.statistics import (
    LayerStatistics,
    chan_merge,
    channel_means,
    local_statistics,
    name_of,
    normalize,
)

__all__ = ["Lockstep", "batch_norm_counters", "thread_context"]


@dataclass
class _Statistics:
    """What the helper thread brings to a BatchNorm call: its samples' per-channel statistics."""

    count: int
    mean: Tensor
    m2: Tensor
    momentum: float
    #: Per-sample channel means, which the later micro-batches are checked against.
    sample_means: Tensor


@dataclass
class _Done:
    """The helper's forward ended: ``complete`` unless it stopped after the last BatchNorm call."""

    complete: bool


class _Abandoned(BaseException):
    """Unwinds the helper's forward when the caller's forward failed first."""


def thread_context(device: torch.device) -> Callable[[], ContextManager[None]]:
    """The calling thread's autocast and CUDA stream, to be entered again in another thread:
    both are thread-local, and phase 1 must compute exactly as the training forward does."""
    autocasts = [(kind, dtype) for kind, dtype in map(_autocast_state, ("cpu", "cuda")) if dtype is not None]
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def enter() -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if stream is not None:
                stack.enter_context(torch.cuda.device(device))
                stack.enter_context(torch.cuda.stream(stream))
            for kind, dtype in autocasts:
                stack.enter_context(torch.autocast(kind, dtype=dtype))
            yield

    return enter


def _autocast_state(kind: str) -> tuple[str, Optional[torch.dtype]]:
    """(kind, dtype) of the calling thread's autocast for device type ``kind``; dtype None when off."""
    try:
        enabled, dtype = torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)
    except TypeError:  # torch < 2.4 has one function per device type
        if kind == "cpu":
            enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        else:
            enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return kind, dtype if enabled else None


class Lockstep:
    """Runs ``rest()`` (phase 1's forward of the other samples; None if there are none) in a helper
    thread, in turns with the caller's training forward inside ``with lockstep:``. A new thread per
    step, so that its OpenMP team, which competes with the caller's on CPU, ends with the step.

    The caller leads: at its BatchNorm call i it lets the helper finish call i-1 and run up to call
    i, merges both halves' statistics (and every rank's, through ``statistics.ranks``), updates the
    running statistics once, adds the layer to ``statistics`` and normalizes its half with the projected
    BatchNorm. Leading keeps DistributedDataParallel's buffer broadcast, at the start of the caller's
    forward, ahead of anything the helper changes. ``counters`` maps a running_mean's id to its
    layer's ``num_batches_tracked``: the caller takes back its own count of each call before the
    helper counts it, so the helper's momentum (momentum=None) and the counters are one forward's.
    """

    def __init__(self, statistics: FullBatchStatistics, rest: Optional[Callable[[], Any]],
                 context: Callable[[], ContextManager[None]], counters: dict[int, Tensor]):
        self.statistics = statistics
        self._rest = rest
        self._context = context
        self._counters = counters
        self._thread: Optional[threading.Thread] = None
        self._caller_turn = threading.Semaphore(0)
        self._helper_turn = threading.Semaphore(0)
        #: What the helper left when it gave the turn back; None before its first turn.
        self._message: Union[None, _Statistics, _Done, BaseException] = None
        self._reply: Optional[LayerStatistics] = None
        self._abandoned = False
        self._intercept: Optional[ContextManager[None]] = None

    # -- the caller's side -----------------------------------------------------------------------

    def __enter__(self) -> "Lockstep":
        self.statistics.start_statistics_pass()
        self._intercept = intercept_batch_norm(self._caller_call)
        self._intercept.__enter__()
        if self._rest is not None:
            self._thread = threading.Thread(target=self._run, name="autobatch-phase-1", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        try:
            if kind is None:
                self._finish()
        finally:
            self._stop_helper()
            self._intercept.__exit__(None, None, None)

    def _turn_to_helper(self) -> Union[_Statistics, _Done]:
        """Let the helper run until its next BatchNorm call or its end; what it brings back."""
        self._helper_turn.release()
        self._caller_turn.acquire()
        message = self._message
        if isinstance(message, BaseException):
            raise message
        return message

    def _finish(self) -> None:
        complete = True
        if self._thread is not None:
            message = self._turn_to_helper()
            if isinstance(message, _Statistics):
                raise different_calls("full-batch", "micro-batch", len(self.statistics.layers))
            complete = message.complete
        self.statistics.finish_statistics_pass(complete)

    def _stop_helper(self) -> None:
        if self._thread is None:
            return
        if self._message is None or isinstance(self._message, _Statistics):  # it waits for a turn
            self._abandoned = True
            self._helper_turn.release()
        self._thread.join()
        self._thread = None

    def _caller_call(self, call: BatchNormCall) -> Tensor:
        index = len(self.statistics.layers)
        name = name_of(call, self.statistics.names, index)
        with torch.no_grad():
            mean, var = local_statistics(call.input.detach(), call.eps)
            count, m2, momentum = call.values_per_channel, var * call.values_per_channel, call.momentum
            if self._thread is not None:
                counter = self._counters.get(id(call.running_mean))
                if counter is not None:
                    counter.sub_(1)
                message = self._turn_to_helper()
                if isinstance(message, _Done):
                    raise different_calls("micro-batch", "full-batch", index)
                check_same_channels(mean.shape[0], message.mean.shape[0], index, name)
                count, mean, m2 = chan_merge(message.count, message.mean, message.m2, count, mean, m2)
                momentum = message.momentum
            layer = self.statistics.merge(call, name, count, mean, m2, momentum)
            if self._thread is not None:
                # The helper's samples follow this first micro-batch's.
                layer.sample_means, layer.first_row = message.sample_means, call.input.shape[0]
        self.statistics.add(call, layer)
        self._reply = layer
        return self.statistics.project(call, layer, index)

    # -- the helper's side -----------------------------------------------------------------------

    def _run(self) -> None:
        message: Union[_Done, BaseException]
        try:
            self._wait_for_turn()
            # Intercepts are per thread: the helper routes its own calls.
            with torch.no_grad(), self._context(), intercept_batch_norm(self._helper_call):
                self._rest()
            message = _Done(complete=True)
        except StopForward:
            message = _Done(complete=False)
        except _Abandoned:
            return
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread, raised there
            message = error
        self._message = message
        self._caller_turn.release()

    def _wait_for_turn(self) -> None:
        self._helper_turn.acquire()
        if self._abandoned:
            raise _Abandoned

    def _helper_call(self, call: BatchNormCall) -> Tensor:
        mean, var = local_statistics(call.input, call.eps)
        count = call.values_per_channel
        self._message = _Statistics(count, mean, var * count, call.momentum,
                                    channel_means(call.input, mean.dtype, per_sample=True))
        self._caller_turn.release()
        self._wait_for_turn()  # the caller merges this call, and runs up to its next one
        self.statistics.stop_after_last_call()
        return normalize(call, self._reply)


def batch_norm_counters(modules: list[nn.Module]) -> dict[int, Tensor]:
    """``num_batches_tracked`` of every layer that counts its training forwards, by running_mean id."""
    return {id(m.running_mean): m.num_batches_tracked for m in modules
            if m.training and m.running_mean is not None and m.num_batches_tracked is not None}
