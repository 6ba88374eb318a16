"""Stages carried by errors: the innermost stage wins, and the stage unwinds with its block."""
import pytest

from autobatch.stages import Stage, entered, stage_of


def test_an_error_carries_the_innermost_stage():
    with pytest.raises(MemoryError) as raised:
        with entered(Stage.UPDATE):
            with entered(Stage.PHASE1):
                raise MemoryError
    assert stage_of(raised.value) is Stage.PHASE1


def test_an_error_outside_every_stage_is_the_micro_batches():
    assert stage_of(MemoryError()) is Stage.MICRO_BATCHES
    with entered(Stage.UPDATE):
        pass
    assert stage_of(KeyboardInterrupt()) is Stage.MICRO_BATCHES
