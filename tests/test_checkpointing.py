"""Checkpointing policies: which modules they name, and their forwards wrapped only while applied."""
import torch

from autobatch.checkpointing import Checkpointing, candidates
from tests.common import ResidualNet, compiled


def test_candidates_name_modules_with_parameters_depth_by_depth():
    model = ResidualNet(blocks=2)
    labels = {policy.label: policy.modules for policy in candidates(model)}
    assert labels["none"] == ()
    assert labels["depth 1"] == ("stem", "bn", "blocks", "fc")  # head_bn is an Identity: no parameters
    assert labels["depth 2"] == ("blocks.0", "blocks.1")
    assert labels["depth 2, selective"] == labels["depth 2"]


def test_a_policy_applies_to_a_model_that_has_its_modules_compiled_or_not():
    model = ResidualNet(blocks=2)
    policy = Checkpointing(("blocks.1",))
    assert policy.applies_to(model) and policy.applies_to(compiled(model, []))
    assert not Checkpointing(("blocks.2",)).applies_to(model)


def test_applied_wraps_forwards_and_puts_back_the_modules_own():
    model = ResidualNet(blocks=2)
    own = model.blocks[1].forward
    model.blocks[1].forward = own  # an instance forward of the model's own, as Accelerate sets one
    with Checkpointing(("blocks.0", "blocks.1")).applied(model):
        assert "forward" in vars(model.blocks[0]) and model.blocks[1].forward is not own
        model(torch.randn(2, 3, 6, 6)).sum().backward()
    assert "forward" not in vars(model.blocks[0]) and model.blocks[1].forward is own
