"""The cache record: its JSON round trip, and every field checked before a plan is built from it."""
import json

import pytest

from autobatch.checkpointing import Checkpointing
from autobatch.modes import Mode
from autobatch.planning.record import FORMAT, PlanRecord


def test_a_record_comes_back_from_its_json_as_it_was():
    record = PlanRecord(capacity=6, points=[(2, 108, 120), (4, 108, 140)], resident_per_element=0.25,
                        phase1_points=[(6, 108, 90)], phase1_base=64.0, phase1_chunks=2, budget_bytes=1 << 20,
                        bn=Mode.EXACT, checkpointing=Checkpointing(("layer1", "layer2"), True, "depth 1"),
                        failed={108: 8}, updates={108: 4096})
    data = json.loads(json.dumps(record.to_json()))
    assert data["format"] == FORMAT
    assert PlanRecord.from_json(data) == record
    assert PlanRecord.from_json(data, share=6) == record


@pytest.mark.parametrize("change, problem", [
    ({"capacity": 7}, "capacity 7 is larger than this run's batch of 6"),
    ({"phase1_chunks": 7}, "phase1_chunks 7 is more than this run's batch of 6"),
    ({"points": [[8, 108, 10]]}, "points measure more samples than this run's batch of 6"),
    ({"checkpointed": ["a", 3]}, "checkpointed is not a list of module names"),
    ({"selective": "yes"}, "selective 'yes' is not true or false"),
    ({"failed": [[108]]}, "failed is not a list of"),
    ({"bn": "auto"}, "bn 'auto' is not a mode a plan runs"),
    ({"updates": [[108, -1]]}, "updates are not"),
])
def test_each_field_is_checked_and_named(change, problem):
    data = {**PlanRecord(capacity=4, points=[(2, 108, 120)]).to_json(), **change}
    with pytest.raises(ValueError, match=problem):
        PlanRecord.from_json(data, share=6)
