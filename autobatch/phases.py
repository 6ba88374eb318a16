"""The phases of a step, which decide how running out of memory is recovered.

    with entered(Phase.STATISTICS_PASS):
        ...                                   # an error raised here carries the phase
    phase_of(error)                           # Phase.STATISTICS_PASS; Phase.MICRO_BATCHES if none
"""
from __future__ import annotations

import contextlib
import enum
from typing import Iterator

__all__ = ["Phase", "entered", "phase_of", "tag"]

_ATTRIBUTE = "_autobatch_phase"


class Phase(enum.Enum):
    """Where in a step an error came from."""

    MICRO_BATCHES = "micro-batches"
    #: two_pass's no-grad forward of the whole batch (more chunks recover it).
    STATISTICS_PASS = "phase 1"
    #: Phase 1 alongside the first micro-batch (running it first recovers it).
    LOCKSTEP = "phase 1 alongside the first micro-batch"
    #: Clipping, ``before_step`` and the optimizer's update.
    UPDATE = "optimizer update"


def tag(error: BaseException, phase: Phase) -> BaseException:
    """Mark ``error`` as raised in ``phase`` unless an inner phase marked it first; returns it."""
    if not hasattr(error, _ATTRIBUTE):
        try:
            setattr(error, _ATTRIBUTE, phase)
        except AttributeError:  # an exception type without a __dict__: counted as the micro-batches'
            pass
    return error


@contextlib.contextmanager
def entered(phase: Phase) -> Iterator[None]:
    """Errors raised inside carry ``phase`` (the innermost phase wins)."""
    try:
        yield
    except BaseException as error:
        tag(error, phase)
        raise


def phase_of(error: BaseException) -> Phase:
    return getattr(error, _ATTRIBUTE, Phase.MICRO_BATCHES)
