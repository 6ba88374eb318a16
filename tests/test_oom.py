"""Out of memory recognised in its spellings; autobatch's own "no plan fits" is a MemoryError but never one."""
import copy

import pytest
import torch
from torch import nn

import autobatch
from autobatch.oom import PlanDoesNotFit, is_out_of_memory
from tests.common import assert_same_state, model_state


def test_out_of_memory_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried..."))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shapes do not match"))


def test_a_plan_that_does_not_fit_is_a_memory_error_but_not_out_of_memory():
    error = PlanDoesNotFit("not even a micro-batch of one sample fits the memory budget")
    assert isinstance(error, MemoryError) and not is_out_of_memory(error)


def test_no_plan_fitting_raises_it_from_step_and_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 4))
    before = copy.deepcopy(model_state(model))
    optimizer = torch.optim.Adam(model.parameters())
    ab = autobatch.wrap(model, optimizer, 8, nn.CrossEntropyLoss(), memory_budget=1000, cache=False)
    with pytest.raises(MemoryError) as raised:  # what users catch keeps working
        ab.step(torch.randn(8, 64), torch.randint(0, 4, (8,)))
    assert type(raised.value) is PlanDoesNotFit
    assert "not even a micro-batch of one sample fits the memory budget" in str(raised.value)
    assert_same_state(before, model_state(model))
    assert not optimizer.state and ab.plan is None
