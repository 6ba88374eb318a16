"""The plan's life (tuning.py) through the training step: real measurement, the cache, out-of-memory recovery."""
import copy
import json
import types
import logging

import pytest
import torch
from torch import nn

import autobatch
from autobatch.batchnorm.randomness import RandomDraws
from autobatch.modes import Boundaries
from autobatch.planning.measure import peak_bytes, warm_optimizer_state
from autobatch.planning.planner import Ran
from autobatch.transaction import trial_transaction as preserved
from tests import common
from tests.common import assert_same_state, mlp, model_state

ce = nn.CrossEntropyLoss()


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def no_bn_convnet():
    """Without BatchNorm (every split gives the full batch's gradient), and with more activation memory
    per sample than parameters and optimizer state: its peak grows with the micro-batch."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3))


def data(n=32, size=32, dtype=torch.float32):
    return common.data(n, (3, size, size), seed=1, dtype=dtype)


def step_peak(model, optimizer, x, y, n):
    """The peak of one real training micro-step of n samples, measured independently of the planner."""
    def work():
        ce(model(x[:n]), y[:n]).backward()  # slices of the host batch, as a real step takes them
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with preserved(model, optimizer):
        warm_optimizer_state(optimizer)
        return peak_bytes(work, torch.device("cpu"), model, optimizer, (x, y))  # the batch is there already


def test_chosen_micro_batch_is_the_largest_that_fits_the_budget():
    model, (x, y) = convnet(), data()
    optimizer = torch.optim.Adam(model.parameters())
    ab = autobatch.wrap(model, optimizer, 32, ce, memory_budget="6MiB", bn="micro")
    plan = ab.tune(x, y)
    assert plan.source == "measured" and 1 < plan.capacity < 32
    assert plan.budget_bytes == int(6 * 2**20 * 0.9)
    assert plan.trials <= 4
    assert step_peak(model, optimizer, x, y, plan.capacity) <= plan.budget_bytes
    assert step_peak(model, optimizer, x, y, plan.capacity + 1) > plan.budget_bytes
    assert "measured" in str(plan) and "6.00 MiB" in str(plan)


def test_trials_leave_no_trace():
    model, (x, y) = convnet(), data()
    model[2].eval()  # a mode to keep
    optimizer = torch.optim.Adam(model.parameters())
    before, rng = model_state(model), torch.get_rng_state()
    autobatch.wrap(model, optimizer, 32, ce, memory_budget="6MiB").tune(x, y)
    assert_same_state(before, model_state(model))
    assert not optimizer.state
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and not model[2].training


def count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls


def test_second_launch_uses_the_cache_without_any_trial(private_plan_cache):
    model, (x, y) = convnet(), data()
    first = autobatch.wrap(model, torch.optim.Adam(model.parameters()), 32, ce, memory_budget="6MiB").tune(x, y)
    assert len(list((private_plan_cache / "plans").glob("*.json"))) == 1
    again = convnet()
    calls = count_forwards(again)
    second = autobatch.wrap(again, torch.optim.Adam(again.parameters()), 32, ce, memory_budget="6MiB").tune(x, y)
    assert (second.source, second.trials, calls) == ("cache", 0, [])
    assert second.micro_batch == first.micro_batch
    forced = autobatch.wrap(again, torch.optim.Adam(again.parameters()), 32, ce, memory_budget="6MiB",
                            cache="refresh").tune(x, y)
    assert forced.source == "measured" and calls


@pytest.mark.parametrize("content", [b"{\"truncated", b"\xff\xfe not UTF-8", b'{"micro_batch": "4"}'],
                         ids=["truncated", "not-utf8", "string-micro-batch"])
def test_a_corrupt_cache_is_survived(private_plan_cache, caplog, content):
    model, (x, y) = convnet(), data()
    wrap = lambda: autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 32, ce,  # noqa: E731
                                  memory_budget="6MiB")
    fitted = wrap().tune(x, y)
    (path,) = (private_plan_cache / "plans").glob("*.json")
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        plan = wrap().tune(x, y)
    assert plan.source == "measured" and plan.capacity == fitted.capacity
    assert str(path) in caplog.text
    assert json.loads(path.read_text())["capacity"] == fitted.capacity  # and it is rewritten


def test_phase_one_that_does_not_fit_is_chunked():
    model, (x, y) = convnet(), data(64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ab = autobatch.wrap(model, optimizer, 64, ce, memory_budget="6MiB")
    plan = ab.tune(x, y)
    assert plan.phase1_chunks > 1 and "approximate" in str(plan)
    ab.step(x, y)
    assert model[1].num_batches_tracked.item() == 1


# -- out of memory during training -----------------------------------------------------------

class OutOfMemoryAt:
    """A loss that runs out of memory once, at a chosen micro-step, after it is armed."""

    def __init__(self, micro_step):
        self.micro_step, self.calls, self.armed = micro_step, 0, False

    def __call__(self, outputs, targets):
        if self.armed:
            self.calls += 1
            if self.calls == self.micro_step + 1:
                self.armed = False
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return ce(outputs, targets)


def auto_with_micro_batch(model, optimizer, loss_fn, x, y, micro_batch, **options):
    """An AutoBatch whose measured plan lands on ``micro_batch``: the budget lies halfway between the
    measured peaks of ``micro_batch`` and one more sample. bn="two_pass" unless given: the trials' micro-batch
    peaks are its steps' (a precise step keeps phase 1's boundaries on top)."""
    options.setdefault("bn", "two_pass")
    first = autobatch.wrap(model, optimizer, len(x), loss_fn, memory_budget=10**10, **options)
    with preserved(model, optimizer):
        warm_optimizer_state(optimizer)
        low, high = (first._planner.setting.trials.micro_step_peak((x, y), n) for n in (micro_batch, micro_batch + 1))
    assert low < high
    ab = autobatch.wrap(model, optimizer, len(x), loss_fn, memory_budget=int((low + high) / 2 / 0.9),
                        **options)
    assert ab.tune(x, y).capacity == micro_batch
    return ab


@pytest.mark.parametrize("micro_step", [0, 2])
def test_out_of_memory_redoes_the_same_batch_with_a_smaller_micro_batch(micro_step, caplog):
    torch.manual_seed(0)
    model = no_bn_convnet().double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, 3, 16, 16, dtype=torch.float64), torch.randint(0, 3, (16,))
    loss_fn = OutOfMemoryAt(micro_step)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ab = auto_with_micro_batch(model, optimizer, loss_fn, x, y, 5)
    loss_fn.armed = True
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        loss = ab.step(x, y)
    assert ab.plan.capacity == 3 and "out of memory at micro_batch=4: capacity now 3" in ab.plan.reason
    assert "redoing the same logical batch" in caplog.text
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    expected = ce(reference(x), y)
    expected.backward()
    ref_optimizer.step()
    assert loss == pytest.approx(expected.item(), rel=1e-12)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert ((p - q).norm() / q.norm()).item() < 1e-10


def test_out_of_memory_with_batch_norm_counts_the_batch_once():
    model, (x, y) = convnet(), data(16)
    model.double()
    x = x.double()
    uninterrupted = copy.deepcopy(model)
    loss_fn = OutOfMemoryAt(1)
    ab = auto_with_micro_batch(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, x, y, 6)
    loss_fn.armed = True
    ab.step(x, y)
    autobatch.wrap(uninterrupted, torch.optim.SGD(uninterrupted.parameters(), lr=0.1), 16, ce,
                   micro_batch=6, bn="two_pass").step(x, y)
    for key, value in uninterrupted.state_dict().items():
        if "running" in key or "num_batches" in key:
            torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-12, atol=1e-14, msg=key)
    assert model[1].num_batches_tracked.item() == 1


def test_out_of_memory_in_phase_one_chunks_it():
    class FailsInPhaseOne(nn.Module):
        def __init__(self):
            super().__init__()
            self.armed = False

        def forward(self, x):
            # A no-grad forward of more than 8 samples does not fit: phase 1, and the memory-format
            # trial that comes first (autobatch.layout), which then keeps the inputs' format.
            if self.armed and not torch.is_grad_enabled() and len(x) > 8:
                raise torch.OutOfMemoryError("CUDA out of memory (injected in phase 1)")
            return x

    model, (x, y) = convnet(), data(16)
    trap = FailsInPhaseOne()
    model.insert(0, trap)
    ab = auto_with_micro_batch(model, torch.optim.SGD(model.parameters(), lr=0.1), ce, x, y, 6)
    trap.armed = True
    ab.step(x, y)
    assert ab.plan.phase1_chunks == 2 and ab.plan.capacity == 6
    assert model[2].num_batches_tracked.item() == 1
    assert ab._strategy.layout.memory_format is torch.preserve_format


def test_grow_back_after_clean_steps():
    torch.manual_seed(0)
    model = no_bn_convnet()
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 3, (16,))
    loss_fn = OutOfMemoryAt(0)
    ab = auto_with_micro_batch(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, x, y, 8,
                               grow_after=2)
    loss_fn.armed = True
    ab.step(x, y)
    assert ab.plan.capacity == 6
    ab.step(x, y)
    assert ab.plan.capacity == 6
    ab.step(x, y)
    assert ab.plan.capacity == 8 and "grown back" in ab.plan.reason


def test_out_of_memory_with_a_fixed_micro_batch_is_raised_and_changes_nothing():
    model = nn.Sequential(mlp(), nn.BatchNorm1d(3))
    loss_fn = OutOfMemoryAt(1)
    loss_fn.armed = True
    before = model_state(model)
    ab = autobatch.wrap(model, torch.optim.Adam(model.parameters()), 8, loss_fn, micro_batch=3)
    with pytest.raises(torch.OutOfMemoryError):
        ab.step(torch.randn(8, 6), torch.randint(0, 3, (8,)))
    assert_same_state(before, model_state(model))


def test_grad_scaler_is_clean_after_out_of_memory():
    torch.manual_seed(0)
    model = no_bn_convnet()
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 3, (16,))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    loss_fn = OutOfMemoryAt(1)
    ab = auto_with_micro_batch(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, x, y, 5,
                               scaler=scaler, max_grad_norm=10.0)
    loss_fn.armed = True
    ab.step(x, y)
    ab.step(x, y)  # a second step after recovery: unscale_ would fail on a dirty scaler
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    autobatch.wrap(reference, torch.optim.SGD(reference.parameters(), lr=0.1), 16, ce, micro_batch=4,
                   scaler=ref_scaler, max_grad_norm=10.0).step(x, y)
    assert scaler.get_scale() == ref_scaler.get_scale()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_plan_on_a_real_gpu_fits_its_budget():
    model = convnet().cuda()
    x, y = data(64, size=64)
    optimizer = torch.optim.Adam(model.parameters())
    ab = autobatch.wrap(model, optimizer, 64, ce, memory_budget="256MiB")
    plan = ab.tune(x, y)
    assert plan.source == "measured" and "nvml" in plan.device
    torch.cuda.reset_peak_memory_stats()
    ab.step(x, y)
    assert torch.cuda.max_memory_allocated() <= plan.budget_bytes


def test_a_batch_sliced_from_a_whole_dataset_plans_like_a_batch_of_its_own():
    # The demo's case: batches that are views of a dataset held on the host, whose storage is not
    # the step's memory (psutil's available memory already excludes it).
    x, y = data(256)
    plans = []
    for inputs, targets in ((x[:16], y[:16]), (x[:16].clone(), y[:16].clone())):
        model = convnet()
        # cache=False: both measured (the second would find the first's plan).
        ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, ce, memory_budget="64MiB",
                            cache=False)
        plans.append(ab.tune(inputs, targets))
    assert plans[0].points == plans[1].points and plans[0].micro_batch == plans[1].micro_batch


def test_a_transient_out_of_memory_leaves_the_cached_plan_as_fitted(private_plan_cache):
    model, (x, y) = convnet(), data(16)
    loss_fn = OutOfMemoryAt(0)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, loss_fn, memory_budget="6MiB")
    fitted = ab.tune(x, y).capacity
    assert fitted > 1
    loss_fn.armed = True
    ab.step(x, y)
    # The step ran again under a smaller plan: without what keeping every boundary of precise adds, which goes first.
    assert ab.plan.boundaries is Boundaries.GROUPED and 3073 in ab._planner.state.recovery.grouped
    again = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, ce, memory_budget="6MiB")
    plan = again.tune(x, y)
    assert (plan.source, plan.capacity) == ("cache", fitted)


@pytest.mark.parametrize("error", [
    MemoryError(), torch.OutOfMemoryError(""), RuntimeError("CUDA error: out of memory\nCUDA kernel errors might "
                                                            "be asynchronously reported"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")], ids=["empty-MemoryError", "empty-OutOfMemoryError",
                                                                 "cuda-text", "cublas", "cudnn"])
def test_every_spelling_of_out_of_memory_is_recovered(error):
    torch.manual_seed(0)
    model = no_bn_convnet().double()
    x, y = torch.randn(16, 3, 16, 16, dtype=torch.float64), torch.randint(0, 3, (16,))
    failures = [error]

    def loss_fn(outputs, targets):
        if failures:
            raise failures.pop()
        return ce(outputs, targets)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ab = autobatch.wrap(model, optimizer, 16, ce, memory_budget=10**10)
    ab.tune(x, y)
    ab.loss_fn = loss_fn
    before = ab.plan.capacity
    ab.step(x, y)
    assert ab.plan.capacity < before and not failures


def test_tune_leaves_existing_gradients_as_they_were():
    model, (x, y) = convnet(), data(16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ab = autobatch.wrap(model, optimizer, 16, ce, memory_budget="6MiB")
    ab.step(x, y)  # the optimizer now has momentum buffers
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    grads = [p.grad for p in model.parameters()]
    ab.tune(x, y)
    assert all(p.grad is g and torch.all(g == 0.5) for p, g in zip(model.parameters(), grads))


def test_phase_one_random_draws_are_counted_in_the_plan(monkeypatch):
    """Dropout masks recorded in phase 1 stay resident through the micro-batches: the plan leaves room."""
    def dropout_net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Dropout(0.3), nn.BatchNorm2d(64), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 5))

    x, y = data(32)
    models, plans = {}, {}
    for counted in (True, False):
        model = dropout_net()
        # cache=False: measured both times (the second would find the first's plan).
        ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 32, ce, memory_budget="24MiB",
                            cache=False)
        with monkeypatch.context() as patch:
            if not counted:
                patch.setattr(RandomDraws, "nbytes", property(lambda self: 0))
            plans[counted] = ab.tune(x, y)
        models[counted] = ab._planner.state.model
    masks = 32 * 64 * 32 * 32  # one byte per element of the whole batch's mask
    size = plans[True].sample_size
    assert models[True].fixed(size) - models[False].fixed(size) == pytest.approx(masks, rel=1e-6)
    assert plans[True].micro_batch < plans[False].micro_batch < 32


def test_out_of_memory_before_the_update_itself_is_recovered():
    """Running out of memory in before_step is recovered: the update is taken again, alone, at the same plan."""
    model, (x, y) = convnet(), data(16)
    failures = [torch.OutOfMemoryError("CUDA out of memory (injected in before_step)")]

    def before_step(ab):
        if failures:
            raise failures.pop()

    optimizer = torch.optim.Adam(model.parameters())
    ab = autobatch.wrap(model, optimizer, 16, ce, memory_budget="6MiB", before_step=before_step)
    fitted = ab.tune(x, y).capacity
    ab.step(x, y)
    assert not failures and ab.plan.capacity == fitted
    assert {state["step"].item() for state in optimizer.state.values()} == {1.0}


def test_a_micro_batch_whose_trial_ran_out_of_memory_is_never_planned(monkeypatch, private_plan_cache):
    """Trials from 7 samples on run out of memory while the line through those that fit allows more: the
    plan stays below 7, at the first launch and from the cache."""
    def micro_step_peaks(self, batch, n):
        self.steps += 1
        return None if n >= 7 else (1000 * n, 500)  # the micro-batch's forward and backward, then its update

    monkeypatch.setattr("autobatch.planning.trials.Trials.micro_step_peaks", micro_step_peaks)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    plans = []
    for _ in range(2):
        model = mlp()
        ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, ce, memory_budget=20_000,
                            bn="micro")
        plans.append(ab.tune(x, y))
    assert plans[0].source == "measured" and plans[1].source == "cache"
    assert [plan.capacity for plan in plans] == [6, 6]


def test_every_step_measured_above_its_prediction_corrects_the_model():
    model, (x, y) = convnet(), data()
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 32, ce, memory_budget="6MiB",
                        bn="micro", cache=False)
    plan = ab.tune(x, y)
    planner, n, s = ab._planner, plan.micro_batch, plan.sample_size
    model = planner.state.model
    before = model.predict(n, s)
    above = int(plan.predicted_peak_bytes * 1.05)  # within the safety margin, but above the prediction
    meter = types.SimpleNamespace(micro_batches_peak=above, phase1_peak=None, update_peak=None,
                                  segment_backward_peak=None)
    assert not planner.went(Ran(plan, n, meter, measured=True))
    assert (n, s, above) in model.points and model.predict(n, s) > before
    assert planner.sizing.for_size(planner.state, plan, s).capacity <= plan.capacity


def test_a_first_step_at_larger_samples_stays_in_the_budget_when_the_update_dominates(monkeypatch):
    """#29: parameters and Adam's state outweigh the activations at the first sample size, so every trial peaks
    in the update; the first step at 16x larger images still stays within the budget (measured on the host:
    its micro-batches' and its update's peaks), and so does a size between the two."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4))
    measured = []
    observe = autobatch.planning.planner.Planner._observe

    def recording(self, n, meter):
        measured.append((self.state.plan.sample_size, n, meter.micro_batches_peak, meter.update_peak))
        observe(self, n, meter)

    monkeypatch.setattr("autobatch.planning.planner.Planner._observe", recording)
    ab = autobatch.wrap(model, torch.optim.Adam(model.parameters()), 16, ce, memory_budget="12MiB",
                        cache=False, bn="micro")
    for size in (16, 64, 32):
        ab.step(torch.randn(16, 3, size, size), torch.randint(0, 4, (16,)))
    budget = ab.plan.budget_bytes
    assert ab._planner.state.model.updates, "the update measured apart"
    assert [s for s, *_ in measured] == [3 * 64 * 64 + 1]  # the new, larger size's first step (images and a label)
    for s, n, micro_batches, update in measured:
        assert max(micro_batches, update) <= budget, (s, n, micro_batches, update, budget)


def test_tune_keeps_a_micro_batch_the_user_fixed():
    """#40: the fixed size is a planner of its own; ``tune`` measured and replaced it before (capacity 32)."""
    model, (x, y) = convnet(), data()
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 32, ce, micro_batch=5, cache=False)
    plan = ab.tune(x, y)
    assert (plan.source, plan.capacity, plan.splits) == ("user", 5, [5, 5, 5, 5, 4, 4, 4])
    ab.step(x, y)
    assert ab.plan.splits == [5, 5, 5, 5, 4, 4, 4]


def test_a_failed_first_step_leaves_the_planner_as_before_it():
    """The step's transaction keeps the planner's whole state: the plan, the memory models, the ceilings."""
    model, (x, y) = convnet(), data()
    calls = []

    def failing(outputs, targets):
        calls.append(1)
        raise ValueError("the user's loss fails")

    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 32, failing, memory_budget="6MiB",
                        bn="micro", cache=False)
    with pytest.raises(ValueError, match="the user's loss fails"):
        ab.step(x, y)
    state = ab._planner.state
    assert calls and ab.plan is None and state.model is None and state.limit is None and state.failed == {}


def test_a_fixed_micro_batch_out_of_memory_keeping_every_boundary_is_redone_with_the_grouped_ones():
    """The batch a fixed micro_batch redoes: where recomputing whole segments in precise's backward (chosen after the
    first, measured step) runs out of memory, the step runs again recomputing micro-batch by micro-batch; where
    keeping every boundary then runs out, again keeping the grouped ones, as the first did."""
    (x, y), nets = data(16), [convnet(), convnet()]
    loss_fn = OutOfMemoryAt(0)
    runs = [autobatch.wrap(net, torch.optim.SGD(net.parameters(), lr=0.1), 16, loss, micro_batch=4, cache=False)
            for net, loss in zip(nets, (loss_fn, ce))]
    for ab in runs:
        ab.step(x, y)
        assert ab.plan.boundaries is Boundaries.WHOLE_SEGMENTS and ab.plan.gradient.startswith("precise")
    for after in (Boundaries.EVERY, Boundaries.GROUPED):
        loss_fn.armed, loss_fn.calls = True, 0
        for ab in runs:
            ab.step(x, y)
        assert not loss_fn.armed and runs[0].plan.boundaries is after
        # Once: an update taken twice would move the weights by a step (about 1e-2). Recomputing whole segments
        # rounds otherwise than micro-batch by micro-batch (float32 convolutions of other batch sizes).
        for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_segment_backward_that_does_not_fit_keeps_its_boundaries_in_host_memory_on_cuda_only():
    """Where precise's segment backward passes the budget (measured) or runs out of memory with the grouped
    boundaries: on the host the projected backward runs; on CUDA the boundaries go to pinned host memory first
    (Boundaries.HOST), and only where that runs out too the projected backward. The sizing's choices alone, on
    this CPU: the device it reads is made CUDA for the calls."""
    from autobatch.stages import Stage
    model, (x, y) = convnet(), data(16)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, ce, memory_budget="6MiB",
                        bn=autobatch.TwoPass(precise=True), cache=False)
    ab.tune(x, y)
    state, sizing = ab._planner.state, ab._planner.sizing
    plan = ab.plan.replace(boundaries=Boundaries.GROUPED, boundary_bytes=0)  # (every one fits this budget)
    s = plan.sample_size
    assert len(plan.splits) > 1
    results = {}
    for device in ("cpu", "cuda"):
        ab._micro.device = torch.device(device)
        try:
            out_of_memory = sizing.after_out_of_memory(state, plan, Stage.SEGMENT_BACKWARD, "injected")
            again = sizing.after_out_of_memory(state, out_of_memory, Stage.SEGMENT_BACKWARD, "injected")
            state.recovery.host.clear(), state.recovery.not_precise.clear()
            state.model.backwards[s] = 2 * state.limit.budget_bytes  # as if measured over the budget
            over = sizing.for_size(state, plan, s)
            del state.model.backwards[s]
            results[device] = out_of_memory, again, over
        finally:
            ab._micro.device = torch.device("cpu")
    out_of_memory, again, over = results["cpu"]
    assert out_of_memory.not_precise.startswith("its segment backward ran out of memory")
    assert over.not_precise.startswith("its segment backward peaks at")
    out_of_memory, again, over = results["cuda"]
    assert out_of_memory.not_precise is None and out_of_memory.boundaries is Boundaries.HOST
    assert again.not_precise.startswith("its segment backward ran out of memory")  # in host memory too
    assert over.not_precise is None and over.boundaries is Boundaries.HOST


def test_precise_s_boundaries_step_down_after_running_out_of_memory():
    """Whole segments -> every boundary -> the grouped ones -> (CUDA, out of memory in the segment backward) host
    memory -> nothing
    smaller (a fixed micro_batch raises; the measured planner takes the projected backward). One rule, for both
    planners; the devices stand for themselves here."""
    from autobatch.planning.recovery import boundaries_after
    from autobatch.stages import Stage
    model = convnet()
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, ce, micro_batch=4, cache=False)
    plan = ab.plan
    steps = {device: [boundaries_after(plan.replace(boundaries=boundaries), stage, torch.device(device))
                      for boundaries, stage in ((Boundaries.WHOLE_SEGMENTS, Stage.SEGMENT_BACKWARD),
                                                (Boundaries.EVERY, Stage.MICRO_BATCHES),
                                                (Boundaries.GROUPED, Stage.SEGMENT_BACKWARD),
                                                (Boundaries.GROUPED, Stage.MICRO_BATCHES),
                                                (Boundaries.HOST, Stage.SEGMENT_BACKWARD))]
             for device in ("cpu", "cuda")}
    assert steps["cpu"] == [Boundaries.EVERY, Boundaries.GROUPED, None, None, None]
    assert steps["cuda"] == [Boundaries.EVERY, Boundaries.GROUPED, Boundaries.HOST, None, None]
