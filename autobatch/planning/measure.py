"""Measuring the peak memory of a piece of work, for real.

    >>> peak = peak_bytes(lambda: train_one_micro_batch(8), torch.device("cuda"))

On CUDA: the caching allocator's peak statistics. On the host: every tensor storage that the
work's ops create is followed from its allocation to its release (a dispatch mode, as PyTorch's own
MemTracker does), so the peak of live tensor bytes is measured, not estimated; a torch.compile'd
model runs eagerly there.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from autobatch.split import leaves
from autobatch.transaction import warm_optimizer_state

__all__ = ["StepMeter", "peak_bytes", "stage_peaks", "tensor_bytes", "warm_optimizer_state"]


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive while active, and their peak.

    Every op's outputs are looked at; a storage is counted from the first time it is seen until
    Python's weak reference to it dies, which is when PyTorch frees it.
    """

    def __init__(self, known: list[torch.Tensor], outside: Sequence[torch.Tensor] = (), limit: Optional[int] = None):
        super().__init__()
        #: Where the work is stopped, as a device stops it: out of memory the moment the live bytes pass it.
        self._limit = limit
        # A storage's death is noted by its weak reference's callback, a C method (list.append): none of
        # our Python runs as a tensor dies, so a Ctrl-C then is raised in the code that freed it instead of
        # being swallowed, as Python swallows exceptions inside weakref callbacks and finalizers. (The
        # weakref module's own dictionaries and finalize run Python callbacks; none is used here.) The
        # references die with the measurement, and their callbacks with them.
        self._sizes: dict[weakref.ref, int] = {}
        self._released: list[weakref.ref] = []
        # The data the work reads exists before and after it: a view of it (a micro-batch sliced
        # from the batch, or from a whole dataset) is no new memory.
        self._outside = {weakref.ref(tensor.untyped_storage()) for tensor in outside}
        self._live = self.peak = 0
        for tensor in known:
            self._see(tensor)

    @property
    def live(self) -> int:
        """The bytes alive now."""
        while self._released:
            self._live -= self._sizes.pop(self._released.pop())
        return self._live

    def _see(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = weakref.ref(storage)  # equal to the reference kept for it, while it lives
        if key in self._outside:
            return
        size, old = storage.nbytes(), self._sizes.get(key)
        if old == size:
            return
        live = self.live
        if old is None:
            key = weakref.ref(storage, self._released.append)
        self._sizes[key] = size
        self._live = live + size - (old or 0)
        self.peak = max(self.peak, self._live)
        if self._limit is not None and self._live > self._limit:
            raise torch.OutOfMemoryError(f"autobatch: {self._live} bytes of tensors alive, over the memory budget's "
                                         f"{self._limit} (host memory, followed tensor by tensor)")

    def __exit__(self, *args: Any) -> None:
        super().__exit__(*args)
        self._sizes.clear()  # their callbacks die with them: a storage that outlives us runs nothing of ours
        self._released.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self._see(leaf)
        return out


def _resident(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t.grad for t in tensors if t.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def tensor_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the model's parameters, gradients, buffers and the optimizer's state."""
    return _LiveBytes(_resident(model, optimizer)).live


def _eagerly() -> ContextManager[Any]:
    """torch.compile'd code runs eagerly. Dynamo skips any frame called under a dispatch mode, and
    (pytorch/pytorch#190286) goes on skipping it afterwards: one measured step would leave the
    user's compiled model uncompiled for good."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def peak_bytes(work: Callable[[], None], device: torch.device, model: nn.Module,
               optimizer: torch.optim.Optimizer, data: Any = None) -> int:
    """The peak bytes of tensors alive on ``device`` while ``work()`` runs, the model's included.
    ``data``: the batch the work reads (tensors, or containers of them); on the host, where it
    already lies, it and its views are not counted."""
    return stage_peaks([work], device, model, optimizer, data)[0]


def stage_peaks(stages: Sequence[Callable[[], None]], device: torch.device, model: nn.Module,
                optimizer: torch.optim.Optimizer, data: Any = None, limit: Optional[int] = None) -> list[int]:
    """`peak_bytes` of each of ``stages``, run one after the other (what one leaves alive counts in the
    next): a micro-step's forward and backward, then its update, say. ``limit``: on the host, the work
    runs out of memory (torch.OutOfMemoryError) the moment its live tensors pass that many bytes, as a
    trial on a device would at the device's end, so that a trial never passes the budget."""
    outside = [leaf for _, leaf in leaves(data) if isinstance(leaf, torch.Tensor)]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    peaks = []
    with StepMeter(device, model, optimizer, outside, host=True, limit=limit) as meter:
        for index, stage in enumerate(stages):
            stage()
            if cuda:
                torch.cuda.synchronize(device)
            if index < len(stages) - 1:
                peaks.append(meter.stage_done())
    return peaks + [meter.peak]


class StepMeter:
    """The peak memory of a real training step, stage by stage: phase 1's, the micro-batches' (with phase 1's
    draws resident), then the update's. On CUDA from the allocator's statistics, at no cost (their peak is
    reset at each stage); on the host with the tracker above, only where asked (``host``: a sample size
    the memory model has not measured), since following every tensor slows the step.

        with StepMeter(device, model, optimizer, batch_tensors, host=True) as meter:
            phase_one()
            meter.phase1_done(ran=True)
            micro_batches()
            meter.micro_batches_done()        # where work follows them: precise's segment backward
            segment_backward()
            meter.update_starts()
            update()
        meter.phase1_peak, meter.micro_batches_peak, meter.segment_backward_peak, meter.update_peak
    """

    def __init__(self, device: torch.device, model: nn.Module, optimizer: torch.optim.Optimizer,
                 outside: Sequence[torch.Tensor] = (), host: bool = False, limit: Optional[int] = None):
        self.device = device
        self._limit = limit
        self.cuda = device.type == "cuda"
        self.active = self.cuda or host
        self._model, self._optimizer, self._outside = model, optimizer, outside
        self._tracker: Optional[_LiveBytes] = None
        self._stack = contextlib.ExitStack()
        #: The last stage's peak (the update's, where it was marked; else the micro-batches').
        self.peak: Optional[int] = None
        self.phase1_peak: Optional[int] = None
        self._micro_batches: Optional[int] = None
        self._segment_backward: Optional[int] = None
        self._after_micro_batches = False
        self._updated = False

    def __enter__(self) -> "StepMeter":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.active:
            self._tracker = _LiveBytes(_resident(self._model, self._optimizer), self._outside, self._limit)
            self._stack.enter_context(_eagerly())
            self._stack.enter_context(self._tracker)
        return self

    def _peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else self._tracker.peak

    def stage_done(self) -> Optional[int]:
        """The peak since the last stage ended (None where not measuring); the next stage is measured apart."""
        if not self.active:
            return None
        peak = self._peak()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker.peak = self._tracker.live
        return peak

    def phase1_done(self, ran: bool) -> None:
        """Phase 1 ended (``ran``: it ran at all): its peak is kept, and the micro-batches' measured apart."""
        peak = self.stage_done()
        if ran:
            self.phase1_peak = peak

    def micro_batches_done(self) -> None:
        """The micro-batches ended and work follows them before the update (precise's segment backward): their
        peak is kept, and that work's measured apart."""
        self._micro_batches, self._after_micro_batches = self.stage_done(), True

    def update_starts(self) -> None:
        """The micro-batches (and what followed them) ended: their peaks are kept, the update's measured apart."""
        peak = self.stage_done()
        if self._after_micro_batches:
            self._segment_backward = peak
        else:
            self._micro_batches = peak
        self._updated = True

    @property
    def micro_batches_peak(self) -> Optional[int]:
        return self._micro_batches if self._updated or self._after_micro_batches else self.peak

    @property
    def segment_backward_peak(self) -> Optional[int]:
        """Precise's segment backward's peak; None where the step had none (or was not measured)."""
        if not self._after_micro_batches:
            return None
        return self._segment_backward if self._updated else self.peak

    @property
    def update_peak(self) -> Optional[int]:
        return self.peak if self._updated else None

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if self.active:
            self.peak = self._peak()
        self._stack.close()
        self._tracker = None
