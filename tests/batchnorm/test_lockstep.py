"""lockstep.py: phase 1 alongside the first micro-batch gives what phase 1 first gives, in float64."""
import copy
import logging
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autobatch
from tests.common import Flat, ResidualNet, assert_same_state, model_state, variants

ce = nn.CrossEntropyLoss()
LOCKSTEP = autobatch.TwoPass(lockstep=True)


def helper_threads():
    return [t for t in threading.enumerate() if t.name == "autobatch-phase-1"]


class Reused(nn.Module):
    """One BatchNorm layer called twice per forward (its counter counts both calls)."""

    def __init__(self, momentum):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4, momentum=momentum)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(self.bn(x).mean((2, 3)))


def train(model, x, y, lockstep, steps=2, micro_batch=5, **options):
    """Parameters, buffers, losses and plan after ``steps`` SGD steps with momentum."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ab = autobatch.wrap(model, opt, len(x), ce, micro_batch=micro_batch, bn=autobatch.TwoPass(lockstep=lockstep),
                        **options)
    losses = [ab.step(x, y) for _ in range(steps)]
    return model.state_dict(), losses, ab.plan


def assert_close_states(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("make", [lambda m: ResidualNet(blocks=2, head_norm=True), Reused],
                         ids=["residual", "reused-layer"])
def test_lockstep_equals_phase_one_first(make, momentum):
    torch.manual_seed(0)
    model = make(momentum).double()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
            m.num_batches_tracked.fill_(3)
    x, y = torch.randn(16, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (16,))
    first_state, first_losses, _ = train(copy.deepcopy(model), x, y, lockstep=False)
    state, losses, plan = train(copy.deepcopy(model), x, y, lockstep=True)
    assert plan.phase1.lockstep and "alongside the first micro-batch" in str(plan)
    assert losses == pytest.approx(first_losses, rel=1e-10)
    assert_close_states(state, first_state)
    # The forward of the first step is the full batch's, and the logical batch is counted once a step.
    assert losses[0] == pytest.approx(ce(copy.deepcopy(model)(x), y).item(), rel=1e-10)
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            assert value.item() == 3 + 2 * (2 if make is Reused else 1)


@pytest.mark.parametrize("name, norm, shape", list(variants()), ids=[v[0] for v in variants()])
def test_batch_norm_variants(name, norm, shape):
    torch.manual_seed(0)
    model = Flat(norm).double()
    if norm.running_mean is not None:
        norm.running_mean.uniform_(-1, 1)
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 1
    y = torch.randn(*shape, dtype=torch.float64)
    results = []
    for lockstep in (False, True):
        trained = copy.deepcopy(model)
        opt = torch.optim.SGD(trained.parameters(), lr=0.1)
        ab = autobatch.wrap(trained, opt, 16, nn.MSELoss(), micro_batch=5, bn=autobatch.TwoPass(lockstep=lockstep))
        results.append((ab.step(x, y), trained.state_dict()))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-10)
    assert_close_states(results[1][1], results[0][1])


def test_compute_loss_and_the_last_short_batch():
    torch.manual_seed(0)
    model = ResidualNet(blocks=1).double()
    batch = {"image": torch.randn(11, 3, 6, 6, dtype=torch.float64), "label": torch.randint(0, 5, (11,))}
    results = []
    for lockstep in (False, True):
        trained = copy.deepcopy(model)
        ab = autobatch.wrap(trained, torch.optim.SGD(trained.parameters(), lr=0.1), 16,
                            compute_loss=lambda m, b: ce(m(b["image"]), b["label"]), micro_batch=4,
                            bn=autobatch.TwoPass(lockstep=lockstep))
        results.append((ab.step(batch), trained.state_dict()))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-10)
    assert_close_states(results[1][1], results[0][1])


def test_the_helper_computes_under_the_callers_autocast():
    torch.manual_seed(0)
    model = ResidualNet(blocks=1)
    seen = []
    model.stem.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), o.dtype)))
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, ce, micro_batch=4, bn=LOCKSTEP)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ab.step(x, y)
    assert (False, torch.bfloat16) in seen  # phase 1 of the other samples, in the helper thread
    assert set(seen) == {(False, torch.bfloat16), (True, torch.bfloat16)}
    seen.clear()
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, ce, micro_batch=4, bn=LOCKSTEP,
                        autocast_dtype=torch.bfloat16)
    ab.step(x, y)
    assert set(seen) == {(False, torch.bfloat16), (True, torch.bfloat16)}


class FailsWhen(nn.Module):
    """Raises in phase 1 of the other samples (the helper thread) or in the training forward (grad)."""

    def __init__(self, in_phase_one, error):
        super().__init__()
        self.in_phase_one, self.error, self.armed = in_phase_one, error, True

    def forward(self, x):
        in_helper = threading.current_thread().name == "autobatch-phase-1"
        if self.armed and (in_helper if self.in_phase_one else torch.is_grad_enabled()):
            self.armed = False
            raise self.error
        return x


def model_with_trap(trap):
    torch.manual_seed(0)
    model = ResidualNet(blocks=1)
    model.blocks.insert(0, trap)
    return model


@pytest.mark.parametrize("in_phase_one", [True, False], ids=["helper", "caller"])
def test_an_error_on_either_side_leaves_no_trace_and_no_thread(in_phase_one):
    model = model_with_trap(FailsWhen(in_phase_one, KeyError("boom")))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = model_state(model)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, ce, micro_batch=4, bn=LOCKSTEP)
    with pytest.raises(KeyError, match="boom"):
        ab.step(torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,)))
    assert F.batch_norm is torch.nn.functional.batch_norm
    assert_same_state(before, model_state(model))
    assert not helper_threads()


class ExtraBatchNormWhenLarge(nn.Module):
    """A model whose BatchNorm calls depend on the batch: one more call for more than 4 samples."""

    def __init__(self):
        super().__init__()
        self.bn, self.extra = nn.BatchNorm1d(6), nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.bn(x)
        return self.fc(self.extra(x) if len(x) > 4 else x)


def test_batch_norm_calls_that_depend_on_the_data_are_reported():
    model = ExtraBatchNormWhenLarge()
    before = model_state(model)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, ce, micro_batch=4, bn=LOCKSTEP)
    with pytest.raises(RuntimeError, match="same sequence of BatchNorm calls"):
        ab.step(torch.randn(16, 6), torch.randint(0, 3, (16,)))
    assert_same_state(before, model_state(model))
    assert not helper_threads()


def test_out_of_memory_alongside_the_first_micro_batch_falls_back_to_phase_one_first(caplog):
    x, y = torch.randn(16, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (16,))
    model = model_with_trap(FailsWhen(True, torch.OutOfMemoryError("CUDA out of memory (injected)"))).double()
    reference = model_with_trap(FailsWhen(True, None)).double()
    reference.blocks[0].armed = False
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        state, losses, plan = train(model, x, y, lockstep=True, steps=1)
    reference_state, reference_losses, _ = train(reference, x, y, lockstep=False, steps=1)
    assert not plan.phase1.lockstep and plan.micro_batch == 5
    assert "phase 1 now runs before the micro-batches" in caplog.text
    assert losses == pytest.approx(reference_losses, rel=1e-10)
    assert_close_states(state, reference_state)  # running statistics and counters updated once
    assert not helper_threads()

