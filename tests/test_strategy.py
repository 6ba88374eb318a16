"""The BatchNorm mode, decided once: strategy_for's choice, and each step's plain fallback."""
import pytest
import torch
from torch import nn

from autobatch.batchnorm import strategy_for
from autobatch.batchnorm.micro import Micro
from autobatch.batchnorm.strategy import Plain
from autobatch.batchnorm.two_pass import TwoPass
from autobatch.microstep import MicroStep
from tests.models import ResidualNet


def micro_step(model=None):
    model = model or ResidualNet(blocks=1)
    return MicroStep(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss())


@pytest.mark.parametrize("bn, kind", [("two_pass", TwoPass), ("micro", Micro)])
def test_each_mode_is_one_strategy_object(bn, kind):
    strategy = strategy_for(bn, micro_step())
    assert type(strategy) is kind and strategy.name == bn
    assert len(strategy.layers) == 3  # the stem's and the block's two BatchNorm layers


def test_bad_modes_are_refused_where_the_mode_is_decided():
    with pytest.raises(ValueError, match="bn must be one of .* frozen as constants"):
        strategy_for("frozen", micro_step())
    with pytest.raises(ValueError, match="lockstep runs phase 1 of bn='two_pass'"):
        strategy_for("micro", micro_step(), lockstep=True)


@pytest.mark.parametrize("bn", ["two_pass", "micro"])
def test_a_step_is_plain_with_one_micro_batch_or_without_batch_statistics(bn):
    model = ResidualNet(blocks=1)
    strategy = strategy_for(bn, micro_step(model))
    assert strategy.for_step([4, 4]) is strategy
    assert isinstance(strategy.for_step([8]), Plain)
    model.eval()
    assert isinstance(strategy.for_step([4, 4]), Plain)
    assert isinstance(strategy_for(bn, micro_step(nn.Linear(3, 2))).for_step([4, 4]), Plain)


def test_only_two_pass_has_a_statistics_pass():
    model = ResidualNet(blocks=1)
    assert strategy_for("two_pass", micro_step(model)).needs_statistics_pass()
    assert not strategy_for("micro", micro_step(model)).needs_statistics_pass()
    model.eval()
    assert not strategy_for("two_pass", micro_step(model)).needs_statistics_pass()


@pytest.mark.parametrize("bn", ["two_pass", "micro"])
def test_a_given_micro_batch_plans_the_mode_asked_for(bn):
    import autobatch

    model = ResidualNet(blocks=1)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, nn.CrossEntropyLoss(),
                        micro_batch=4, bn=bn)
    assert ab.plan.bn == bn and f"bn            {bn}" in str(ab.plan)
