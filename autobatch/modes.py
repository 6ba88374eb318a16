"""The BatchNorm modes, as values: which one a step runs, and its settings. Decided once, at ``wrap``.

    autobatch.wrap(...)                                   # bn="auto": the exact gradient, whole or precise
    autobatch.wrap(..., bn="two_pass")                    # the same as bn=autobatch.TwoPass()
    autobatch.wrap(..., bn=autobatch.TwoPass(precise=True, phase1_memory_format=torch.channels_last))
    autobatch.wrap(..., bn=autobatch.Exact())             # or "micro", "exact", "auto"
"""
from __future__ import annotations

import enum
from dataclasses import InitVar, dataclass, field, replace
from typing import Any, ClassVar, Optional, Union

import torch

__all__ = ["Auto", "BN_MODES", "BatchNormMode", "Exact", "LOCKSTEP_REMOVED", "Micro", "Mode", "PHASE1_FORMATS",
           "Boundaries", "Pieces", "TwoPass", "bn_mode", "settled", "timed_choices"]

#: The error for the removed ``lockstep`` setting, wherever it is still passed.
LOCKSTEP_REMOVED = ("lockstep (phase 1 beside the first micro-batch, in a helper thread) was removed: it saved no time "
                    "over running phase 1 first (bench/results/cost.md) and could not run under FSDP2. Drop "
                    "lockstep=...; phase 1 now always "
                    "runs before the micro-batches, in chunks where the whole batch does not fit")

#: What ``TwoPass(phase1_memory_format=...)`` accepts; None is "measure".
PHASE1_FORMATS = (None, torch.channels_last, torch.preserve_format)


@dataclass(frozen=True)
class BatchNormMode:
    """A ``bn`` mode and its settings."""

    name: ClassVar[str]
    #: Whether the mode plans its own micro-batch (the whole batch where it fits): no int micro_batch then.
    plans_micro_batch: ClassVar[bool] = False

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class TwoPass(BatchNormMode):
    """Full-batch statistics from a no-grad forward of the logical batch (phase 1), then micro-batches.

    ``phase1_memory_format``: phase 1's 4-D (5-D) inputs in
    ``torch.channels_last``, or as given with ``torch.preserve_format``; None (default): the inputs' own
    format, or, where choices by timing are on (`timed_choices`), both timed at the first phase 1 and the
    faster kept where the statistics agree (the two formats round apart, so a seeded run would not repeat).

    ``precise``: the full batch's exact gradient instead of the projected backward. Phase 1 keeps the
    tensors at every BatchNorm's boundary for the whole batch (the model traced with torch.fx), and
    the backward goes down one segment at a time, each micro-batch's segment recomputed from them
    (autobatch.batchnorm.segment_run): about the compute of the projected two_pass, more memory. A model
    that cannot be traced or cut trains with the projected backward, said once in a warning. ``None``:
    precise where it can run (one process), else the projected backward; ``Auto``'s default."""

    name: ClassVar[str] = "two_pass"
    phase1_memory_format: Optional[torch.memory_format] = None
    precise: Optional[bool] = False
    #: Removed (phase 1 beside the first micro-batch, in a helper thread): refused with an error that says so.
    lockstep: InitVar[Optional[bool]] = None

    def __post_init__(self, lockstep: Optional[bool]) -> None:
        if lockstep is not None:
            raise TypeError(LOCKSTEP_REMOVED)
        if self.precise is not None and not isinstance(self.precise, bool):
            raise TypeError(f"precise must be True, False or None (where it can run), got {self.precise!r}")
        if not any(self.phase1_memory_format is allowed for allowed in PHASE1_FORMATS):
            raise ValueError(f"phase1_memory_format must be None (measure), torch.channels_last or "
                             f"torch.preserve_format (the inputs' own), got {self.phase1_memory_format!r}")


@dataclass(frozen=True)
class Micro(BatchNormMode):
    """Each micro-batch normalized with its own statistics; running statistics committed once, pooled."""

    name: ClassVar[str] = "micro"


@dataclass(frozen=True)
class Exact(BatchNormMode):
    """The whole logical batch in one forward and backward, made to fit by activation checkpointing."""

    name: ClassVar[str] = "exact"
    plans_micro_batch: ClassVar[bool] = True


@dataclass(frozen=True)
class Auto(BatchNormMode):
    """The default: the full batch's exact gradient wherever it can be had. ``Exact`` (the whole batch in
    one piece, checkpointed as needed) where it fits, else ``two_pass`` with these settings: by default its
    exact backward where it can run (``TwoPass(precise=None)``), else the projected one, said once.

    ``by_timing``: where both fit, time the whole batch against micro-batches and keep micro-batches when
    the whole batch is over 1.5x slower. None (default) follows `timed_choices` (PyTorch's own
    ``torch.backends.cudnn.benchmark``): off, the choice is by memory alone and a seeded run repeats bit
    for bit. With an int ``micro_batch`` the mode is ``two_pass`` at that size."""

    name: ClassVar[str] = "auto"
    plans_micro_batch: ClassVar[bool] = True
    two_pass: TwoPass = field(default_factory=lambda: TwoPass(precise=None))
    by_timing: Optional[bool] = None


def timed_choices() -> bool:
    """Whether autobatch may choose by timing (phase 1's memory format, auto's whole batch against
    micro-batches): where PyTorch itself does, with ``torch.backends.cudnn.benchmark = True``, and never
    under ``torch.use_deterministic_algorithms(True)``. Off by default: choices by timing can differ
    from run to run, and the choices round apart."""
    return bool(torch.backends.cudnn.benchmark) and not torch.are_deterministic_algorithms_enabled()


def settled(mode: BatchNormMode, micro_batch: Any = "auto") -> BatchNormMode:
    """``mode`` with its choices by timing decided (`timed_choices`, read once, at ``wrap``), and ``Auto``
    with an int ``micro_batch`` as the two_pass it runs at that size."""
    timed = timed_choices()
    if isinstance(mode, Auto):
        two_pass = settled(mode.two_pass)
        if micro_batch != "auto":
            return two_pass
        return replace(mode, two_pass=two_pass, by_timing=timed if mode.by_timing is None else mode.by_timing)
    if isinstance(mode, TwoPass) and mode.phase1_memory_format is None and not timed:
        return replace(mode, phase1_memory_format=torch.preserve_format)
    return mode


class Mode(str, enum.Enum):
    """The mode a plan runs ("auto" chooses one of them); compares equal to its name."""

    TWO_PASS = TwoPass.name
    MICRO = Micro.name
    EXACT = Exact.name

    def __str__(self) -> str:
        return self.value


class Pieces(enum.Enum):
    """How a mode cuts a logical batch, as the planner sizes it (autobatch.planning.planner)."""

    #: Micro-batches, the largest that fit (two_pass, micro).
    MICRO_BATCHES = "micro-batches"
    #: The whole batch in one piece, checkpointed where needed (exact).
    WHOLE_BATCH = "the whole batch"
    #: The whole batch where it fits, else micro-batches (auto).
    WHOLE_OR_SPLIT = "the whole batch or micro-batches"


class Boundaries(enum.Enum):
    """What precise's phase 1 keeps of the whole batch for its segment backward (autobatch.batchnorm.segment_run);
    the planner chooses by memory (autobatch.planning.micro_batches)."""

    #: What crosses from one group of segments to a later one (groups of about the square root of their number);
    #: the backward recomputes each group's inner boundary first: one more forward, the least memory.
    GROUPED = "grouped"
    #: Every segment's boundary: no forward recomputed.
    EVERY = "every"
    #: Every segment's boundary, and each segment recomputed for the whole batch at once rather than micro-batch by
    #: micro-batch: fewer, larger recomputations, the fastest; the most memory (one segment's tensors for the whole
    #: batch beside the boundaries).
    WHOLE_SEGMENTS = "every, whole segments"
    #: Every segment's boundary, in host memory (pinned) once phase 1 is done with it, its rows brought back as
    #: the backward reads them: the device holds a segment's micro-batch, not the batch's boundaries.
    HOST = "host"


_BY_NAME = {mode.name: mode for mode in (TwoPass, Micro, Exact, Auto)}
#: The ``bn`` names ``wrap`` accepts, in the order the ranks compare them by.
BN_MODES: tuple[str, ...] = tuple(_BY_NAME)


def bn_mode(bn: Union[str, BatchNormMode, Any]) -> BatchNormMode:
    """``bn`` as a mode value: a name becomes its mode with default settings; a mode stays itself."""
    if isinstance(bn, BatchNormMode):
        return bn
    if isinstance(bn, str) and bn in _BY_NAME:
        return _BY_NAME[bn]()
    hint = (" Statistics frozen as constants (the forum's two-phase scheme) drop BatchNorm's gradient "
            "through its mean and variance and train badly; it is not offered.") if bn == "frozen" else ""
    raise ValueError(f"bn must be one of {BN_MODES} or a mode such as autobatch.TwoPass(), got {bn!r}.{hint}")
