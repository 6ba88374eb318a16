"""Phases carried by errors: the innermost phase wins, and the phase unwinds with its block."""
import pytest

from autobatch.phases import Phase, entered, phase_of


def test_an_error_carries_the_innermost_phase():
    with pytest.raises(MemoryError) as raised:
        with entered(Phase.STATISTICS_PASS):
            with entered(Phase.LOCKSTEP):
                raise MemoryError
    assert phase_of(raised.value) is Phase.LOCKSTEP


def test_an_error_outside_every_phase_is_the_micro_batches():
    assert phase_of(MemoryError()) is Phase.MICRO_BATCHES
    with entered(Phase.UPDATE):
        pass
    assert phase_of(KeyboardInterrupt()) is Phase.MICRO_BATCHES
