"""The BatchNorm mode, decided once: strategy_for's choice, and each step's plain fallback."""
import pytest
import torch
from torch import nn

from autobatch.batchnorm import strategy_for
from autobatch.batchnorm.micro import MicroStrategy
from autobatch.batchnorm.strategy import Plain
from autobatch.batchnorm.two_pass import TwoPassStrategy
from autobatch.microstep import MicroStep
from autobatch.modes import bn_mode
from autobatch.options import Options
from tests.common import ResidualNet


def micro_step(model=None):
    model = model or ResidualNet(blocks=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return MicroStep(model, optimizer, Options.build(model, optimizer, 8, loss_fn=nn.CrossEntropyLoss()))


def strategy(bn, micro):
    return strategy_for(bn_mode(bn), micro)


@pytest.mark.parametrize("bn, kind", [("two_pass", TwoPassStrategy), ("micro", MicroStrategy)])
def test_each_mode_is_one_strategy_object(bn, kind):
    made = strategy(bn, micro_step())
    assert type(made) is kind and made.name == bn
    assert len(made.layers) == 3  # the stem's and the block's two BatchNorm layers


@pytest.mark.parametrize("bn", ["two_pass", "micro"])
def test_a_step_is_plain_with_one_micro_batch_or_without_batch_statistics(bn):
    model = ResidualNet(blocks=1)
    made = strategy(bn, micro_step(model))
    assert made.for_step([4, 4]) is made
    assert isinstance(made.for_step([8]), Plain)
    model.eval()
    assert isinstance(made.for_step([4, 4]), Plain)
    assert isinstance(strategy(bn, micro_step(nn.Linear(3, 2))).for_step([4, 4]), Plain)


def test_only_two_pass_has_a_phase1():
    model = ResidualNet(blocks=1)
    assert strategy("two_pass", micro_step(model)).needs_phase1()
    assert not strategy("micro", micro_step(model)).needs_phase1()
    model.eval()
    assert not strategy("two_pass", micro_step(model)).needs_phase1()


@pytest.mark.parametrize("bn", ["two_pass", "micro"])
def test_a_given_micro_batch_plans_the_mode_asked_for(bn):
    import autobatch

    model = ResidualNet(blocks=1)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, nn.CrossEntropyLoss(),
                        micro_batch=4, bn=bn)
    assert ab.plan.bn == bn and f"bn            {bn}" in str(ab.plan)
