"""One helper swaps a module's forward (autobatch.forward): the module's __dict__ is as before afterwards."""
import pytest
import torch
from torch import nn

from autobatch.forward import ForwardSwap, forward_replaced, forwards_replaced


def test_a_swap_leaves_no_instance_attribute_behind_even_on_error():
    layer = nn.Linear(2, 2)
    before = dict(vars(layer))
    with pytest.raises(ValueError):
        with forward_replaced(layer, lambda x: x * 0):
            assert torch.equal(layer(torch.ones(1, 2)), torch.zeros(1, 2))
            raise ValueError("inside")
    assert vars(layer) == before and "forward" not in vars(layer)


def test_a_forward_the_module_had_as_an_attribute_comes_back():
    layer = nn.Identity()
    own = lambda x: x + 1  # noqa: E731
    layer.forward = own
    with forwards_replaced([(layer, lambda x: x * 10)]):
        assert layer(torch.ones(1)).item() == 10
    assert layer.forward is own and layer(torch.ones(1)).item() == 2


def test_several_swaps_each_wrap_the_forward_before_it_and_come_back_in_order():
    layer = nn.Identity()
    with forwards_replaced((module, lambda x, f=module.forward: f(x) * 2) for module in (layer, layer)):
        assert layer(torch.ones(1)).item() == 4  # the second swap wrapped the first
    assert "forward" not in vars(layer)


def test_a_swap_put_back_from_inside_its_forward_is_put_back_once():
    layer = nn.Linear(2, 2)

    def forward(x):
        swap.restore()  # as the Lightning host does: the module's own forward runs inside
        return layer(x) + 1

    swap = ForwardSwap(layer, forward)
    out = layer(torch.zeros(1, 2))
    swap.restore()
    assert torch.equal(out, layer(torch.zeros(1, 2)) + 1) and "forward" not in vars(layer)
