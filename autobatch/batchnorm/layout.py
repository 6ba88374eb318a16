"""Phase 1's memory format: the inputs' own, or channels_last where it measured faster.

Phase 1 only yields BatchNorm statistics, and a tensor's memory format changes how fast the
convolutions run, not what they compute (up to rounding). Which format wins depends on the model
and the device (bench/results/cost.md), so by default the first phase 1 times both on its own batch
and keeps the faster::

    layout = Phase1Layout(None)                  # None: measure; or torch.channels_last / preserve_format
    with torch.no_grad():
        layout.measure(module, forward, batch, device, ranks)   # once; nothing after that
        forward(layout.convert(batch))           # phase 1

The trial leaves no trace: BatchNorm calls use their own statistics without touching running
statistics, other buffers and the RNG are put back. channels_last is kept only if its statistics
agree with the inputs' own format's (an op that ignores strides would break that) and, on CUDA,
its peak memory is no more than 1% above theirs.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, ContextManager, NamedTuple, Optional

import torch
from torch import Tensor, nn

from autobatch.batchnorm.intercept import BatchNormCall, intercept_batch_norm
from autobatch.batchnorm.randomness import RandomDraws
from autobatch.batchnorm.statistics import with_own_statistics
from autobatch.distributed import Ranks
from autobatch.oom import first_line, is_out_of_memory, release_memory
from autobatch.split import leaves, map_tensors
from autobatch.transaction import RandomState

__all__ = ["Phase1Layout", "to_channels_last"]

log = logging.getLogger(__name__)

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
#: channels_last is chosen only if it saves at least this share of phase 1's time (timing noise).
MARGIN = 0.05
#: Largest relative difference between the two formats' statistics that rounding explains.
AGREEMENT = 1e-2
#: channels_last may need at most this share more memory than the inputs' format (the plan measured
#: phase 1 in that format; chunking phase 1 for the sake of speed would cost exactness).
MEMORY_SLACK = 0.01
#: Timed forwards per format, after one warm-up each; the fastest counts.
ROUNDS = 2

# A rank's verdict, gathered so that every rank decides the same. _UNDECIDED: the forward in the
# inputs' own format raised an error other than out-of-memory, which phase 1 itself then meets and
# reports; measured again at the next phase 1.
_FAILED, _UNDECIDED, _SLOWER, _FASTER, _NOTHING_TO_TRY = range(5)


def _convertible(leaf: Any) -> bool:
    return isinstance(leaf, Tensor) and leaf.is_floating_point() and leaf.dim() in _CHANNELS_LAST


def to_channels_last(tree: Any) -> Any:
    """``tree`` with its 4-D floating-point tensors in channels_last, 5-D ones in channels_last_3d."""
    return map_tensors(tree, lambda leaf: leaf.contiguous(memory_format=_CHANNELS_LAST[leaf.dim()])
                       if _convertible(leaf) else leaf)


def _anything_to_convert(tree: Any) -> bool:
    return any(_convertible(leaf) and not leaf.is_contiguous(memory_format=_CHANNELS_LAST[leaf.dim()])
               for _, leaf in leaves(tree))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Run(NamedTuple):
    """One trial forward: its time, each BatchNorm call's per-channel mean and standard deviation,
    and on CUDA the allocator's peak (the host's tensor bytes do not depend on the format)."""

    seconds: float
    statistics: list[Tensor]
    peak_bytes: Optional[int]


class _SameDraws:
    """Every trial forward gets the first one's random draws (autobatch.batchnorm.randomness), element by
    element whatever the memory format (a mask drawn in channels_last order would put its values
    elsewhere), and starts from the same RNG state: the formats' statistics then differ by rounding alone."""

    def __init__(self) -> None:
        self._draws = RandomDraws()
        self._random = RandomState()
        self._recorded = False

    def __call__(self) -> ContextManager[None]:
        self._random.restore()
        if self._recorded:
            return self._draws.replay(0, 0)  # rows 0: every draw replayed whole, by its shape
        self._recorded = True
        return self._draws.record(0, 0)


def _timed_forward(forward: Callable[[Any], Any], batch: Any, device: torch.device, draws: _SameDraws) -> _Run:
    statistics: list[Tensor] = []

    def own_statistics(call: BatchNormCall) -> Tensor:
        output, mean, invstd = with_own_statistics(call)
        statistics.append(torch.cat([mean.float(), invstd.float().reciprocal()]))
        return output

    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with intercept_batch_norm(own_statistics), draws():
        forward(batch)
    _synchronize(device)
    seconds = time.perf_counter() - start
    return _Run(seconds, statistics, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)


def _difference(statistics: list[Tensor], reference: list[Tensor]) -> float:
    """The largest relative difference between two forwards' statistics, call by call (inf if unlike)."""
    if len(statistics) != len(reference):
        return math.inf
    worst = 0.0
    for ours, theirs in zip(statistics, reference):
        if ours.shape != theirs.shape:
            return math.inf
        relative = float((ours - theirs).norm() / theirs.norm().clamp(min=1e-30))
        worst = max(worst, relative if math.isfinite(relative) else math.inf)
    return worst


class Phase1Layout:
    """The memory format phase 1 runs in: ``memory_format`` given, or measured by `measure`."""

    def __init__(self, memory_format: Optional[torch.memory_format]):
        self.memory_format = memory_format

    @property
    def measured(self) -> bool:
        return self.memory_format is not None

    def convert(self, batch: Any) -> Any:
        """``batch`` as phase 1 takes it (unchanged until measured, or in the inputs' own format)."""
        return to_channels_last(batch) if self.memory_format is torch.channels_last else batch

    def measure(self, module: nn.Module, forward: Callable[[Any], Any], batch: Any, device: torch.device,
                ranks: Ranks) -> None:
        """Time ``forward`` on ``batch`` in both formats and keep the faster; under a process group
        every rank keeps channels_last only if it was faster on every rank. Call under no_grad."""
        if self.measured:
            return
        buffers = [buffer.detach().clone() for buffer in module.buffers()]
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                verdict, saving, reason = _trial(forward, batch, device)
        finally:
            with torch.no_grad():
                for buffer, saved in zip(module.buffers(), buffers):
                    buffer.copy_(saved)
        verdicts = ranks.gather([verdict])[:, 0].tolist()
        if _UNDECIDED in verdicts:
            return  # phase 1 itself fails too, and is handled there; measured at the next one
        if all(v == _FASTER for v in verdicts):
            self.memory_format = torch.channels_last
            log.info("autobatch: phase 1 runs in channels_last, %.0f%% faster here than in the inputs' own "
                     "format (the training forward may gain too: model.to(memory_format=torch.channels_last))",
                     100 * saving)
            return
        self.memory_format = torch.preserve_format
        if verdict == _FASTER:
            reason = "it was not faster on every rank"
        if reason:
            log.info("autobatch: phase 1 keeps the inputs' memory format: %s", reason)


def _trial(forward: Callable[[Any], Any], batch: Any, device: torch.device) -> tuple[int, float, str]:
    """(verdict, share of phase 1's time channels_last saved, why it was not chosen)."""
    if not _anything_to_convert(batch) or torch.are_deterministic_algorithms_enabled():
        # Deterministic runs keep one format: the faster one could differ between runs.
        return _NOTHING_TO_TRY, 0.0, ""
    reference: Optional[_Run] = None
    oom = False
    draws = _SameDraws()
    try:
        reference = _timed_forward(forward, batch, device, draws)
    except Exception as error:  # noqa: BLE001 - phase 1 itself meets it again, and handles it
        oom = is_out_of_memory(error)
    if oom:
        # The trial's whole forward may not fit where phase 1, which stops after the last
        # BatchNorm, does: trying again at every step would cost a failed forward each time.
        release_memory(device)
        return _FAILED, 0.0, "the trial's forward ran out of memory"
    if reference is None:
        return _UNDECIDED, 0.0, ""
    try:
        return _against_channels_last(forward, batch, reference, device, draws)
    except Exception as error:  # noqa: BLE001 - channels_last is an optimization: any failure drops it
        oom = is_out_of_memory(error)
        message = first_line(error)
    if oom:
        release_memory(device)
    return _FAILED, 0.0, f"channels_last failed ({message})"


def _against_channels_last(forward: Callable[[Any], Any], batch: Any, reference: _Run, device: torch.device,
                           draws: _SameDraws) -> tuple[int, float, str]:
    """``_trial``'s verdict once the inputs' format has run (``reference``)."""
    converted = to_channels_last(batch)
    trial = _timed_forward(forward, converted, device, draws)
    difference = _difference(trial.statistics, reference.statistics)
    if difference > AGREEMENT:
        log.warning("autobatch: phase 1 in channels_last gave BatchNorm statistics %.2g (relative) away from "
                    "those in the inputs' own format; keeping that format. An op that ignores its input's "
                    "strides (a custom kernel, say) would explain it.", difference)
        return _FAILED, 0.0, ""
    if reference.peak_bytes is not None and trial.peak_bytes > reference.peak_bytes * (1 + MEMORY_SLACK):
        return _FAILED, 0.0, f"channels_last needed {trial.peak_bytes / reference.peak_bytes - 1:.0%} more memory"
    times: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(ROUNDS):
        order = ((False, batch), (True, converted))
        for channels_last, inputs in (reversed(order) if round_ % 2 else order):
            times[channels_last].append(_timed_forward(forward, inputs, device, draws).seconds)
    saving = 1 - min(times[True]) / min(times[False])
    if saving >= MARGIN:
        return _FASTER, saving, ""
    if saving < 0:
        return _SLOWER, saving, f"channels_last was {-100 * saving:.0f}% slower"
    return _SLOWER, saving, f"channels_last saved only {100 * saving:.0f}% (it must save {100 * MARGIN:.0f}%)"
