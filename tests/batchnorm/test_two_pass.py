"""two_pass: what it says out loud when its statistics are only roughly the whole batch's."""
import logging

import torch
from torch import nn

import autobatch
from tests.common import ResidualNet, data


def test_a_chunked_phase_one_is_said_once_per_wrap_with_what_to_do(caplog):
    model = ResidualNet(blocks=1).double()
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, nn.CrossEntropyLoss(), micro_batch=4)
    ab.plan = ab.plan.replace(phase1_chunks=2)  # as the planner chunks it when it does not fit
    x, y = data(16)
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        ab.step(x, y)
        ab.step(x, y)
    said = [record.getMessage() for record in caplog.records if "phase 1 does not fit" in record.getMessage()]
    assert len(said) == 1 and "2 chunks" in said[0] and "bn='exact'" in said[0] and "memory_budget" in said[0]
    assert "approximate" in str(ab.plan)
