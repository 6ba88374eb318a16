"""Faults injected at every point of a step: out of memory in its spellings, and KeyboardInterrupt.

After each, the model, its gradients, the optimizer's state, BatchNorm buffers, the RNG state and
``F.batch_norm`` are as before the call (float64, exact) and training continues as if nothing had
happened; with micro_batch="auto", running out of memory is recovered and the step equals a clean
step under the plan it recovered to (1e-12)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autobatch
from autobatch import transaction
from tests.common import ResidualNet, assert_same_state, model_state

ce = nn.CrossEntropyLoss()

ERRORS = {
    "empty-oom": lambda: torch.OutOfMemoryError(""),
    "cuda-text": lambda: RuntimeError("CUDA error: out of memory"),
    "cublas": lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    "interrupt": lambda: KeyboardInterrupt(),
}
POINTS = ["phase 1", "forward 0", "forward 1", "backward 0", "backward 1", "optimizer step"]


class Fault:
    """Raises ``error()`` once, at ``point`` of the next step, from hooks on the model's first BatchNorm."""

    def __init__(self, model, optimizer, point, error):
        self.point, self.error, self.armed, self.forwards, self.backwards = point, error, False, 0, 0
        layer = model.bn
        layer.register_forward_pre_hook(self._forward)
        layer.register_full_backward_hook(self._backward)
        step = optimizer.step

        def optimizer_step(*args, **kwargs):
            self._fire("optimizer step")
            return step(*args, **kwargs)

        optimizer.step = optimizer_step

    def _fire(self, point):
        if self.armed and point == self.point:
            self.armed = False
            raise self.error()

    def _forward(self, module, inputs):
        if not torch.is_grad_enabled():
            self._fire("phase 1")
        else:
            self._fire(f"forward {self.forwards}")
            self.forwards += 1

    def _backward(self, module, grad_input, grad_output):
        self._fire(f"backward {self.backwards}")
        self.backwards += 1

    def arm(self):
        self.armed, self.forwards, self.backwards = True, 0, 0


def setup(point, error, **options):
    torch.manual_seed(0)
    model = ResidualNet(blocks=1).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    fault = Fault(model, optimizer, point, ERRORS[error])
    # Phase 1 in the inputs' own format: the measured one could differ between two models, and with it
    # the rounding of phase 1's statistics.
    bn = autobatch.TwoPass(phase1_memory_format=torch.preserve_format)
    ab = autobatch.wrap(model, optimizer, 8, ce, bn=bn, **options)
    return model, optimizer, fault, ab


def batches():
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 3, 6, 6, generator=generator, dtype=torch.float64),
             torch.randint(0, 5, (8,), generator=generator)) for _ in range(2)]


def snapshot(model, optimizer):
    return model_state(model), copy.deepcopy(optimizer.state_dict()), torch.get_rng_state()


def assert_same(before, after):
    assert_same_state(before[0], after[0])
    assert_same_optimizer_state(before[1], after[1])
    assert torch.equal(before[2], after[2])


def assert_same_optimizer_state(before, after):
    """Exactly equal, tensors included (their printed form rounds)."""
    if isinstance(before, torch.Tensor):
        assert isinstance(after, torch.Tensor) and torch.equal(before, after)
    elif isinstance(before, dict):
        assert before.keys() == after.keys()
        for key in before:
            assert_same_optimizer_state(before[key], after[key])
    elif isinstance(before, (list, tuple)):
        assert len(before) == len(after)
        for a, b in zip(before, after):
            assert_same_optimizer_state(a, b)
    else:
        assert before == after


@pytest.mark.parametrize("error", list(ERRORS))
@pytest.mark.parametrize("point", POINTS)
def test_a_fault_with_a_fixed_micro_batch_changes_nothing_and_training_continues(point, error):
    model, optimizer, fault, ab = setup(point, error, micro_batch=4)
    first, second = batches()
    ab.step(*first)
    before = snapshot(model, optimizer)
    fault.arm()
    original = F.batch_norm
    reference_model, reference_optimizer, _, reference = setup(point, error, micro_batch=4)
    reference.step(*first)
    if point == "optimizer step" and error != "interrupt":
        # Out of memory in the update takes the update again, alone: the step is the clean step.
        assert ab.step(*second) == reference.step(*second)
        assert not fault.armed and ab.plan == reference.plan
        assert_same(snapshot(reference_model, reference_optimizer), snapshot(model, optimizer))
        return
    expected = KeyboardInterrupt if error == "interrupt" else (torch.OutOfMemoryError, RuntimeError)
    with pytest.raises(expected):
        ab.step(*second)
    assert not fault.armed, "the fault never fired"
    assert F.batch_norm is original
    assert_same(before, snapshot(model, optimizer))
    # Training goes on as if the failed call had never been made.
    assert ab.step(*second) == reference.step(*second)
    assert_same(snapshot(reference_model, reference_optimizer), snapshot(model, optimizer))


@pytest.mark.parametrize("error", ["empty-oom", "cuda-text", "cublas"])
@pytest.mark.parametrize("point", ["phase 1", "forward 0", "forward 1", "backward 0", "backward 1"])
def test_out_of_memory_with_auto_is_recovered_as_a_clean_step_under_the_new_plan(point, error):
    options = dict(micro_batch="auto", memory_budget=125_000)  # plans 4 of the 8 samples
    model, optimizer, fault, ab = setup(point, error, **options)
    first, second = batches()
    ab.step(*first)
    planned = ab.plan.capacity
    assert 1 < planned < 8
    fault.arm()
    loss = ab.step(*second)
    assert not fault.armed
    # The reference runs the plans given: the first step's, then the one recovered to.
    reference_model, reference_optimizer, _, reference = setup(point, error, micro_batch=planned)
    reference.step(*first)
    reference.plan = ab.plan
    assert loss == pytest.approx(reference.step(*second), rel=1e-12)
    after, expected = snapshot(model, optimizer), snapshot(reference_model, reference_optimizer)
    for key, value in expected[0].items():
        if value is not None:
            torch.testing.assert_close(after[0][key], value, rtol=1e-12, atol=1e-12, msg=key)


def fail_once(monkeypatch, owner, name, error):
    """Make ``owner.name`` raise ``error`` at its next call only."""
    original, errors = getattr(owner, name), [error]

    def failing(*args, **kwargs):
        if errors:
            raise errors.pop()
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return errors


def adam_setup(micro_batch, **options):
    torch.manual_seed(0)
    model = ResidualNet(blocks=1).double()
    # foreach Adam bumps its step count and moments in place, then allocates its square roots.
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, foreach=True)
    ab = autobatch.wrap(model, optimizer, 8, ce, bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format),
                        micro_batch=micro_batch, **options)
    return model, optimizer, ab


@pytest.mark.parametrize("error", list(ERRORS))
def test_an_error_half_way_through_the_optimizers_update_leaves_it_undone(monkeypatch, error):
    """An interrupt there leaves the step undone; out of memory takes the update again from the undone
    state, with its copies on the host: one clean step either way."""
    model, optimizer, ab = adam_setup(4)
    reference_model, reference_optimizer, reference = adam_setup(4)
    first, second = batches()
    ab.step(*first)
    reference.step(*first)
    before = snapshot(model, optimizer)
    errors = fail_once(monkeypatch, torch, "_foreach_sqrt", ERRORS[error]())
    if error == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            ab.step(*second)
        assert_same(before, snapshot(model, optimizer))
        loss = ab.step(*second)
    else:
        loss = ab.step(*second)
    assert not errors, "the fault never fired"
    assert loss == reference.step(*second)
    assert_same(snapshot(reference_model, reference_optimizer), snapshot(model, optimizer))


@pytest.mark.parametrize("error", ["empty-oom", "cuda-text", "cublas"])
def test_out_of_memory_half_way_through_the_update_takes_the_update_again_alone(monkeypatch, error):
    """Gap d: the gradients are complete, so the micro-batches are not run again and the plan stays
    (a smaller micro-batch would not shrink the update, and under two_pass would change the step)."""
    options = dict(memory_budget=125_000)
    model, optimizer, ab = adam_setup("auto", **options)
    reference_model, reference_optimizer, reference = adam_setup("auto", **options)
    first, second = batches()
    ab.step(*first)
    reference.step(*first)
    plan, forwards = ab.plan, []
    model.register_forward_hook(lambda *args: forwards.append(1))
    errors = fail_once(monkeypatch, torch, "_foreach_sqrt", ERRORS[error]())
    loss = ab.step(*second)
    assert not errors
    # Each micro-batch's forward once (phase 1 stops at the last BatchNorm, before the model's forward returns).
    assert ab.plan == plan and len(forwards) == len(plan.splits)
    assert loss == pytest.approx(reference.step(*second), rel=1e-12)
    assert {state["step"].item() for state in optimizer.state.values()} == {2.0}
    after, expected = snapshot(model, optimizer), snapshot(reference_model, reference_optimizer)
    for key, value in expected[0].items():
        if value is not None:
            torch.testing.assert_close(after[0][key], value, rtol=1e-12, atol=1e-12, msg=key)


def test_out_of_memory_after_the_scaler_unscaled_is_recovered():
    """GradScaler remembers that it unscaled this step's gradients; a redone step must not trip on it."""
    def run(fail):
        torch.manual_seed(0)
        model = ResidualNet(blocks=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        ab = autobatch.wrap(model, optimizer, 8, ce, memory_budget=80_000, scaler=scaler,
                            max_grad_norm=1.0, bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format))
        x, y = (t.float() if t.is_floating_point() else t for t in batches()[0])
        ab.tune(x, y)
        with pytest.MonkeyPatch.context() as patch:
            errors = fail_once(patch, torch.nn.utils, "clip_grad_norm_",
                               torch.OutOfMemoryError("")) if fail else []
            loss = ab.step(x, y)
        assert not errors
        return loss, ab.plan, model_state(model), scaler.get_scale()

    loss, plan, state, scale = run(fail=True)
    assert not plan.reason.startswith("out of memory")  # the update alone was taken again
    expected = run(fail=False)
    assert loss == expected[0]
    assert scale == expected[3]
    for key, value in expected[2].items():
        if value is not None:
            torch.testing.assert_close(state[key], value, msg=key)


@pytest.mark.parametrize("copies", ["host", "none"])
def test_where_the_updates_copies_live(monkeypatch, copies):
    """"host": the same all-or-nothing update from copies in host memory, taken again after running out
    of memory. "none": no copies, and an update that ran out of memory half-way is reported, never
    taken again (it could be applied twice)."""
    model, optimizer, ab = adam_setup(4, update_copies=copies)
    reference_model, reference_optimizer, reference = adam_setup(4)
    first, second = batches()
    ab.step(*first)
    reference.step(*first)
    errors = fail_once(monkeypatch, torch, "_foreach_sqrt", torch.OutOfMemoryError("CUDA out of memory (injected)"))
    if copies == "host":
        assert ab.step(*second) == reference.step(*second)
        assert_same(snapshot(reference_model, reference_optimizer), snapshot(model, optimizer))
    else:
        with pytest.raises(RuntimeError, match="update_copies='none' it may be partly applied .* does not take it"):
            ab.step(*second)
        assert {state["step"].item() for state in optimizer.state.values()} == {2.0}  # half applied, once
    assert not errors


def test_update_copies_is_checked():
    with pytest.raises(ValueError, match="update_copies must be one of"):
        adam_setup(4, update_copies="disk")


# -- the transaction's own gaps, each closed ---------------------------------------------------------

def test_the_gradients_the_caller_held_survive_an_error_while_the_step_saves_its_state(monkeypatch):
    """Gap a: the BatchNorm buffers are copied before the caller's gradients are cleared."""
    model, optimizer, _, ab = setup("phase 1", "interrupt", micro_batch=4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    before = snapshot(model, optimizer)
    original = transaction.BatchNormState.__init__

    def interrupted(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(transaction.BatchNormState, "__init__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ab.step(*batches()[0])
    assert_same(before, snapshot(model, optimizer))


def test_an_interrupt_while_the_planner_puts_the_model_back_leaves_it_whole(monkeypatch):
    """Gap b: putting back is taken again from the start when it is interrupted half-way."""
    # cache=False: planned by trials at every tune, which the restore puts back.
    model, optimizer, _, ab = setup("phase 1", "interrupt", memory_budget=125_000, cache=False)
    first, second = batches()
    ab.step(*first)
    before = snapshot(model, optimizer)
    original, interrupts = transaction.Values.restore, [KeyboardInterrupt()]

    def half_then_interrupted(self):
        if interrupts and len(self._saved) > 2:
            with torch.no_grad():
                for tensor, value in self._saved[:2]:
                    tensor.copy_(value)
            raise interrupts.pop()
        original(self)

    monkeypatch.setattr(transaction.Values, "restore", half_then_interrupted)
    ab.plan = None  # plan again: trials change the weights, statistics and counters, then put them back
    with pytest.raises(KeyboardInterrupt):
        ab.tune(*second)
    assert not interrupts
    assert_same(before, snapshot(model, optimizer))


#: Phase 1 in the inputs' own format: the measured one could differ between two models, and with it
#: the rounding of phase 1's statistics.
AS_GIVEN = autobatch.TwoPass(phase1_memory_format=torch.preserve_format)


def dropout_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5)).double()


def test_a_step_taken_again_draws_the_same_random_masks():
    """Gap c: the RNG is put back with everything else, so a step retried after an interrupt (or redone
    after running out of memory) equals a clean step, dropout masks included."""
    first, second = batches()
    runs = []
    for interrupted in (False, True):
        model = dropout_net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ab = autobatch.wrap(model, optimizer, 8, ce, micro_batch=4, bn=AS_GIVEN)
        ab.step(*first)
        if interrupted:
            calls = []

            def fail_in_the_second_backward(module, grad_input, grad_output):
                calls.append(1)
                if len(calls) == 2:
                    raise KeyboardInterrupt

            handle = model[1].register_full_backward_hook(fail_in_the_second_backward)
            with pytest.raises(KeyboardInterrupt):
                ab.step(*second)
            handle.remove()
        runs.append((ab.step(*second), model_state(model)))
    assert runs[0][0] == runs[1][0]
    assert_same_state(runs[0][1], runs[1][1])


@pytest.mark.parametrize("point", ["forward 1", "backward 1"])
def test_a_step_redone_after_out_of_memory_draws_the_same_random_masks(point):
    """Gap c, with micro_batch="auto": the redone step equals a clean step under the plan it recovered to."""
    first, second = batches()
    model = dropout_net()
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, ce, memory_budget=150_000,
                        bn=AS_GIVEN)
    ab.step(*first)
    assert ab.plan.capacity < 8
    layer, calls = model[1], []

    def fault(*args):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handle = (layer.register_forward_pre_hook(fault) if point.startswith("forward")
              else layer.register_full_backward_hook(fault))
    loss = ab.step(*second)
    handle.remove()
    assert ab.plan.reason.startswith("out of memory")
    reference_model = dropout_net()
    reference = autobatch.wrap(reference_model, torch.optim.SGD(reference_model.parameters(), lr=0.1), 8, ce,
                               memory_budget=150_000, bn=AS_GIVEN)
    reference.step(*first)
    reference._planner.state.recovery.ceilings = dict(ab._planner.state.recovery.ceilings)  # the plan it recovered to
    assert loss == reference.step(*second)
    assert (reference.plan.capacity, reference.plan.splits) == (ab.plan.capacity, ab.plan.splits)
    assert_same_state(model_state(reference_model), model_state(model))


def test_a_mode_an_interrupt_kept_from_its_exit_is_popped_when_the_step_is_undone(monkeypatch):
    """A Ctrl-C on a ``with`` line as its block ends comes before the mode's ``__exit__``: the mode that
    replays random draws stayed pushed, and every later torch call of the process ran through it (found by the
    every-line sweep of a two_pass step, at its 1,283rd line)."""
    from torch.overrides import _get_current_function_mode_stack

    from autobatch.batchnorm import randomness
    from tests.common import data

    def interrupted_exit(self, *args):
        raise KeyboardInterrupt  # where Ctrl-C lands: the mode still on the stack

    torch.manual_seed(0)
    model = ResidualNet(blocks=1).double()
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, nn.CrossEntropyLoss(), micro_batch=4,
                        cache=False, bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format))
    before = model_state(model)
    with monkeypatch.context() as patch:
        patch.setattr(randomness._Intercept, "__exit__", interrupted_exit)
        with pytest.raises(KeyboardInterrupt):
            ab.step(*data(8))
    assert _get_current_function_mode_stack() == []
    assert_same_state(before, model_state(model))
    ab.step(*data(8))  # and the next step runs as usual


def test_put_back_runs_every_restore_again_after_an_interrupt():
    done, interrupts = [], [KeyboardInterrupt()]

    def first():
        done.append("first")

    def second():
        if interrupts:
            raise interrupts.pop()
        done.append("second")

    with pytest.raises(KeyboardInterrupt):
        transaction.put_back([first, second])
    assert done == ["first", "first", "second"]


@pytest.mark.slow
def test_ctrl_c_at_any_line_of_the_step_s_transactions_leaves_the_step_whole_or_undone():
    """SIGINT (Ctrl-C as Python delivers it) at every line run in transaction.py and in the update: afterwards
    the model, the caller's gradients and the optimizer are as before the step or as after it, never between."""
    from autobatch import microstep, transaction
    from tests.common import ResidualNet, data

    def fresh():
        torch.manual_seed(0)
        model = ResidualNet(blocks=1).double()
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)  # the caller's gradients, to be kept by an undone step
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        # Phase 1 in the inputs' own format: the format trial's choice, by timings, would round apart.
        mode = autobatch.TwoPass(phase1_memory_format=torch.preserve_format)
        return model, optimizer, autobatch.wrap(model, optimizer, 8, torch.nn.CrossEntropyLoss(), micro_batch=4,
                                                cache=False, bn=mode)

    def state(model, optimizer):
        return {**model_state(model), "momentum": [s.get("momentum_buffer") for s in optimizer.state.values()]}

    x, y = data(8)
    model, optimizer, ab = fresh()
    before = state(model, optimizer)
    ab.step(x, y)
    after = state(model, optimizer)
    files = {transaction.__file__, microstep.__file__}
    swept, interrupted = _sweep(fresh, state, before, after, x, y, lambda code: code.co_filename in files)
    assert interrupted == swept > 50

def _sweep(fresh, state, before, after, x, y, where, first=1, stride=1, then_step=False) -> tuple[int, int]:
    """SIGINT at line ``first``, then every ``stride``-th line a step runs in code ``where`` selects, each time on
    a ``fresh()`` model: afterwards its state is ``before`` or ``after`` the step, autograd is on and no torch
    mode is left pushed (``then_step``: the next step runs too). Returns the lines swept and the interrupts raised."""
    import sys

    from torch.overrides import _get_current_function_mode_stack as _function_modes
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack as _dispatch_modes

    from tests.common import interrupt_at

    target, interrupted, swept = first, 0, 0
    while True:
        model, optimizer, ab = fresh()
        trace, seen = interrupt_at(target, where)
        sys.settrace(trace)
        try:
            ab.step(x, y)
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            sys.settrace(None)
        assert torch.is_grad_enabled(), f"line {target}: grad mode left off"
        assert not _function_modes() and not _dispatch_modes(), f"line {target}: a torch mode left pushed"
        assert_pytorch_s_batch_norm(f"line {target}")
        got = state(model, optimizer)
        whole = all(_same(got[k], after[k]) for k in after) or all(_same(got[k], before[k]) for k in before)
        assert whole, f"line {target}"
        if then_step:
            ab.step(x, y)  # and training goes on
        if seen[0] < target:
            return swept, interrupted
        swept += 1
        target += stride


def assert_pytorch_s_batch_norm(where: str) -> None:
    """F.batch_norm and torch.batch_norm are PyTorch's, and an unrelated model's training-mode forward and
    backward give what they give in a process where autobatch never ran (#39: a Ctrl-C had left them routed)."""
    assert F.batch_norm is _BATCH_NORM and torch.batch_norm is _TORCH_BATCH_NORM, f"{where}: batch_norm replaced"
    layer, x = _UNRELATED
    layer.reset_running_stats()
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.pow(2).sum().backward()
    expected_out, expected_grad, expected_mean = _UNRELATED_RESULT
    assert torch.equal(out, expected_out) and torch.equal(x.grad, expected_grad), f"{where}: another model's BN routed"
    assert torch.equal(layer.running_mean, expected_mean), f"{where}: another model's running statistics skipped"


def _unrelated_result():
    layer, x = _UNRELATED
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.pow(2).sum().backward()
    result = (out.detach(), x.grad, layer.running_mean.clone())
    layer.reset_running_stats()
    return result


_BATCH_NORM, _TORCH_BATCH_NORM = F.batch_norm, torch.batch_norm
_UNRELATED = (nn.BatchNorm2d(3).double(), torch.randn(4, 3, 5, 5, dtype=torch.float64,
                                                        generator=torch.Generator().manual_seed(7)))
_UNRELATED_RESULT = _unrelated_result()


def _same(a, b) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


#: Lines between two interruptions of the whole-step sweep.
def _stride(default: int) -> int:
    """``default``, or every AUTOBATCH_SWEEP_STRIDE-th line where that is set (1: every line)."""
    import os

    return int(os.environ.get("AUTOBATCH_SWEEP_STRIDE", default))


@pytest.mark.slow
@pytest.mark.parametrize("bn, first, stride", [("two_pass", 1, _stride(8)), ("precise", 5, _stride(52)),
                                               ("micro", 2, _stride(8)), ("exact", 3, _stride(8))])
def test_ctrl_c_at_any_line_of_a_whole_step_leaves_it_whole_or_undone(bn, first, stride):
    """#29: SIGINT at the lines a step runs in autobatch and in the optimizer's own Python (SGD with momentum,
    the second step, the plan made): the model, the caller's gradients and the optimizer's state are as before
    the step or as after it, grad mode is on, no torch mode is left pushed, F.batch_norm is PyTorch's and an
    unrelated model's BatchNorm trains as without autobatch (#39), and the next step runs. (A Ctrl-C inside
    torch.no_grad()'s own __enter__ had left autograd off for the rest of the process.) Every 8th line here
    (every 52nd of precise, which runs the traced graph's lines too), from another first line per mode, for
    CI's time; every line with AUTOBATCH_SWEEP_STRIDE=1 (docs/guide/guarantees.md)."""
    import os

    import torch.optim

    from tests.common import ResidualNet, data

    roots = (os.path.dirname(autobatch.__file__), os.path.dirname(torch.optim.__file__))
    x, y = data(8)

    def fresh():
        torch.manual_seed(0)
        model = ResidualNet(blocks=1).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        options = dict(micro_batch=4) if bn != "exact" else dict(memory_budget=10**10)
        mode = autobatch.TwoPass(phase1_memory_format=torch.preserve_format, precise=bn == "precise") \
            if bn in ("two_pass", "precise") else bn
        ab = autobatch.wrap(model, optimizer, 8, torch.nn.CrossEntropyLoss(), cache=False, bn=mode, **options)
        ab.step(x, y)  # the plan and the momentum made, outside the sweep
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)  # the caller's gradients, to be kept by an undone step
        return model, optimizer, ab

    def state(model, optimizer):
        return {**model_state(model), "momentum": [s["momentum_buffer"].clone() for s in optimizer.state.values()]}

    model, optimizer, ab = fresh()
    before = state(model, optimizer)
    ab.step(x, y)
    after = state(model, optimizer)
    swept, interrupted = _sweep(fresh, state, before, after, x, y, lambda code: code.co_filename.startswith(roots),
                                first, stride, then_step=True)
    print(f"{bn}: {swept} interrupts, one every {stride} line(s) from line {first}")  # the figures docs quote (-s)
    assert interrupted == swept > 150

