"""The stages of a step, which decide how running out of memory is recovered.

    with entered(Stage.PHASE1):
        ...                                   # an error raised here carries the stage
    stage_of(error)                           # Stage.PHASE1; Stage.MICRO_BATCHES if none
"""
from __future__ import annotations

import contextlib
import enum
from typing import Iterator

__all__ = ["Stage", "entered", "stage_of", "tag"]

_ATTRIBUTE = "_autobatch_stage"


class Stage(enum.Enum):
    """Where in a step an error came from."""

    MICRO_BATCHES = "micro-batches"
    #: two_pass's phase 1, the no-grad forward of the whole batch (more chunks recover it).
    PHASE1 = "phase 1"
    #: The precise backward after the micro-batches, segment by segment over the whole batch (a smaller
    #: micro-batch does not shrink it: the projected backward recovers it).
    SEGMENT_BACKWARD = "precise backward"
    #: Clipping, ``before_step`` and the optimizer's update.
    UPDATE = "optimizer update"


def tag(error: BaseException, stage: Stage) -> BaseException:
    """Mark ``error`` as raised in ``stage`` unless an inner stage marked it first; returns it."""
    if not hasattr(error, _ATTRIBUTE):
        try:
            setattr(error, _ATTRIBUTE, stage)
        except AttributeError:  # an exception type without a __dict__: counted as the micro-batches'
            pass
    return error


@contextlib.contextmanager
def entered(stage: Stage) -> Iterator[None]:
    """Errors raised inside carry ``stage`` (the innermost stage wins)."""
    try:
        yield
    except BaseException as error:
        tag(error, stage)
        raise


def stage_of(error: BaseException) -> Stage:
    return getattr(error, _ATTRIBUTE, Stage.MICRO_BATCHES)
