"""The planner's state (autobatch.planning.state): one snapshot puts all of it back."""
from autobatch.plan import fixed_plan
from autobatch.planning.model import MemoryModel
from autobatch.planning.state import PlannerState


def test_a_snapshot_puts_back_every_field_however_deep_the_change():
    state = PlannerState(plan=fixed_plan(16, 4), model=MemoryModel(0.0, [(2, 10, 100), (4, 10, 180)]))
    state.recovery.ceilings[10] = (4, "out of memory at 8")
    saved = state.snapshot()
    state.plan = state.plan.replace(capacity=2)
    state.model.add(8, 10, 400)
    state.recovery.ceilings[10] = (2, "out of memory at 4")
    state.recovery.clean_steps, state.failed[10], state.redoing = 3, 8, True
    saved.restore()
    assert state.plan.capacity == 4 and state.model.points == [(2, 10, 100), (4, 10, 180)]
    assert state.recovery.ceilings == {10: (4, "out of memory at 8")} and state.recovery.clean_steps == 0
    assert state.failed == {} and not state.redoing
    state.model.add(8, 10, 400)  # a restore that runs again (after an interrupt) gives the same state
    saved.restore()
    assert state.model.points == [(2, 10, 100), (4, 10, 180)]
