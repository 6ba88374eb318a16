"""recompute.py: activation checkpointing inside the model changes nothing, in float64.

torch.utils.checkpoint calls every BatchNorm of a checkpointed segment again during backward.
The reference is the same model without checkpointing: same parameters, buffers and losses.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import autobatch
from autobatch.batchnorm.intercept import BatchNormCall
from autobatch.batchnorm.recompute import RecomputedCalls
from tests import common
from tests.common import Block, assert_same_state, model_state

ce = nn.CrossEntropyLoss()


class Checkpointed(nn.Module):
    """Stem, two residual blocks (the second with momentum=None) and a BatchNorm1d head; ``reentrant``
    None runs without checkpointing, else the blocks and the head run under torch.utils.checkpoint."""

    def __init__(self, reentrant=None):
        super().__init__()
        self.reentrant = reentrant
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.blocks = nn.Sequential(Block(6), Block(6))
        self.blocks[1].bn2.momentum = None
        self.head = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4))

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            x = self._run(block, x)
        return self._run(self.head, x.mean((2, 3)))

    def _run(self, module, x):
        if self.reentrant is None:
            return module(x)
        return checkpoint(module, x, use_reentrant=self.reentrant)


def train(model, x, y, steps=2, **options):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ab = autobatch.wrap(model, opt, len(x), ce, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [ab.step(x, y) for _ in range(steps)]
    return model_state(model), losses, [str(w.message) for w in caught]


def data(n=12, seed=0):
    return common.data(n, (3, 6, 6), classes=4, seed=seed)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("options", [dict(micro_batch=4, bn="two_pass"), dict(micro_batch=4), dict(micro_batch=4, bn="micro"),
                                     dict(micro_batch=12), dict(micro_batch=5, bn="micro")],
                         ids=["two_pass", "auto (precise)", "micro", "one micro-batch", "micro uneven"])
def test_checkpointing_trains_as_the_model_without_it(reentrant, options):
    x, y = data()
    torch.manual_seed(0)
    plain = Checkpointed().double()
    checkpointed = copy.deepcopy(plain)
    checkpointed.reentrant = reentrant
    expected, expected_losses, _ = train(plain, x, y, **options)
    state, losses, messages = train(checkpointed, x, y, **options)
    assert losses == pytest.approx(expected_losses, rel=1e-12, abs=0)
    assert state.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(state[name], expected[name], rtol=1e-12, atol=1e-12, msg=name)
    assert int(state["blocks.1.bn2.num_batches_tracked"]) == 2  # once per logical batch, not per recomputation
    assert not [m for m in messages if "requires_grad" in m]  # phase 1 runs without gradients on purpose


def test_plain_pytorch_counts_a_recomputation_as_a_batch():
    """Why a recomputation needs handling: without autobatch, checkpointing updates running statistics twice."""
    x, y = data()
    torch.manual_seed(0)
    model = Checkpointed(reentrant=False).double()
    ce(model(x), y).backward()
    assert int(model.blocks[1].bn2.num_batches_tracked) == 2


class SharedInCheckpoint(nn.Module):
    """One BatchNorm layer called twice inside one checkpointed segment."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = checkpoint(self._segment, self.conv(x), use_reentrant=False)
        return self.fc(x.mean((2, 3)))

    def _segment(self, x):
        return self.bn(F.relu(self.bn(x)))


def test_a_layer_run_twice_in_a_checkpointed_segment_is_refused_with_the_model_unchanged():
    x, y = data()
    torch.manual_seed(0)
    model = SharedInCheckpoint().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ab = autobatch.wrap(model, opt, 12, ce, micro_batch=4, bn="two_pass")
    before = model_state(model)
    with pytest.raises(RuntimeError, match=r"'bn' runs 2 times per forward.*checkpoint.*bn='micro'"):
        ab.step(x, y)
    assert_same_state(before, model_state(model))
    assert all(p.grad is None for p in model.parameters())
    # bn="micro" needs no matching: each recomputation normalizes with its own micro-batch's statistics.
    ab = autobatch.wrap(model, opt, 12, ce, micro_batch=4, bn="micro")
    ab.step(x, y)
    assert int(model.bn.num_batches_tracked) == 2  # two calls per forward, one logical batch


def call_of(layer, channels=4):
    return BatchNormCall(torch.zeros(2, channels, 3), layer.running_mean, layer.running_var, layer.weight,
                         layer.bias, 0.1, 1e-5)


def test_recomputed_calls_match_the_forward_call_of_their_layer():
    a, b = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
    calls = RecomputedCalls()
    calls.start_forward()
    for layer in (a, b):
        calls.forward_call(call_of(layer))
    assert calls.match(call_of(b), "b") == 1  # backward recomputes later segments first
    assert calls.match(call_of(a), "a") == 0
    with pytest.raises(RuntimeError, match="'a' ran during backward more often than in the forward"):
        calls.match(call_of(a), "a")
    calls.start_forward()  # the next micro-batch
    calls.forward_call(call_of(a))
    assert calls.match(call_of(a), "a") == 0


def test_checkpointed_two_pass_has_the_full_batch_loss_and_running_statistics():
    x, y = data()
    torch.manual_seed(0)
    full = Checkpointed().double()
    checkpointed = copy.deepcopy(full)
    checkpointed.reentrant = False
    full_loss = ce(full(x), y).item()  # one full-batch forward in training mode: its running statistics
    state, losses, _ = train(checkpointed, x, y, steps=1, micro_batch=4)
    assert losses[0] == pytest.approx(full_loss, rel=1e-12)
    for name, value in full.state_dict().items():
        if "running" in name or "num_batches" in name:
            torch.testing.assert_close(state[name], value, rtol=1e-12, atol=1e-12, msg=name)
