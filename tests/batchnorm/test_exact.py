"""bn="exact": the whole logical batch in one piece under activation checkpointing equals the full
batch in float64 (loss, gradients, parameters after the step, running statistics, counters); the
planner picks a policy by measured peak; bn="auto" chooses between exact and two_pass."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import autobatch
from autobatch.checkpointing import Checkpointing, candidates
from tests import common
from tests.common import ResidualNet, StochasticNet, model_state

ce = nn.CrossEntropyLoss()


def data(n=16, size=8, seed=1):
    return common.data(n, (3, size, size), seed=seed)


def wrapped(model, bn, loss_fn=ce, **options):
    """An AutoBatch over a copy of ``model``."""
    model = copy.deepcopy(model)
    return autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, loss_fn, bn=bn, **options)


def full_batch_step(model, x, y, seed=5):
    """The reference: one plain step on the whole batch; returns loss, gradients, state after."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(seed)
    loss = ce(model(x), y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    return loss.item(), grads, model_state(model)


def exact_step(model, x, y, policy, seed=5, **options):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    grads = []
    ab = autobatch.wrap(model, optimizer, len(x), ce, bn="exact", memory_budget=10**10,
                        before_step=lambda ab: grads.extend(p.grad.clone() for p in model.parameters()), **options)
    ab.tune(x, y)
    ab.plan = ab.plan.replace(checkpointing=policy)
    torch.manual_seed(seed)
    loss = ab.step(x, y)
    return loss, grads, model_state(model), ab


def assert_equal_to_full_batch(model, x, y, policy, reference=None):
    """``reference``: the same model as the full batch runs it, where it differs from ``model``."""
    loss, grads, state, ab = exact_step(copy.deepcopy(model), x, y, policy)
    expected_loss, expected_grads, expected_state = full_batch_step(copy.deepcopy(reference or model), x, y)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    for key, value in expected_state.items():
        if value is not None and not key.endswith(".grad"):
            torch.testing.assert_close(state[key], value, rtol=1e-10, atol=1e-12, msg=key)
    return ab


@pytest.mark.parametrize("label", ["none", "depth 1", "depth 2", "depth 3", "depth 1, selective"])
def test_every_checkpointing_policy_gives_the_full_batch_step(label):
    torch.manual_seed(0)
    model = ResidualNet(blocks=2).double()
    policy = {policy.label: policy for policy in candidates(model)}[label]
    ab = assert_equal_to_full_batch(model, *data(), policy)
    assert ab.plan.bn == "exact" and ab.plan.checkpointed == policy.modules


def test_dropout_and_stochastic_depth_are_recomputed_with_the_forwards_draws():
    torch.manual_seed(0)
    model = StochasticNet(blocks=3).double()
    assert_equal_to_full_batch(model, *data(), Checkpointing(("blocks.0", "blocks.1", "blocks.2"), label="blocks"))


def test_the_users_own_checkpointing_inside_ours():
    class Checkpointed(nn.Module):
        """Checkpoints its first block itself (and plain PyTorch would then update that block's
        running statistics twice: the reference runs it without)."""

        def __init__(self):
            super().__init__()
            self.inner = ResidualNet(blocks=2)
            self.checkpointed = True

        def forward(self, x):
            x = F.relu(self.inner.bn(self.inner.stem(x)))
            first = self.inner.blocks[0]
            x = checkpoint(first, x, use_reentrant=False) if self.checkpointed else first(x)
            x = self.inner.blocks[1](x)
            return self.inner.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    model = Checkpointed().double()
    x, y = data()
    reference = copy.deepcopy(model)
    reference.checkpointed = False
    assert_equal_to_full_batch(model, x, y, Checkpointing(("inner.blocks.1",), label="one"), reference)


def test_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = ResidualNet(blocks=2).double()
    keys = list(model.state_dict())
    policy = candidates(model)[2]
    _, _, _, ab = exact_step(model, *data(), policy)
    assert list(model.state_dict()) == keys
    assert not any("forward" in vars(module) for module in model.modules())
    # An error in the step unwinds the checkpointing too.
    ab.loss_fn = lambda outputs, targets: (_ for _ in ()).throw(KeyError("boom"))
    with pytest.raises(KeyError):
        ab.step(*data())
    assert not any("forward" in vars(module) for module in model.modules())


def test_the_planner_checkpoints_only_where_the_whole_batch_does_not_fit():
    torch.manual_seed(0)
    model = ResidualNet(blocks=2).double()
    x, y = data()
    roomy = wrapped(model, "exact", ce, memory_budget=10**10).tune(x, y)
    assert roomy.checkpointed == () and [c.label for c in roomy.candidates] == ["none"]
    peak = roomy.candidates[0].peak_bytes
    tight = wrapped(model, "exact", ce, memory_budget=int(0.95 * peak / 0.9)).tune(x, y)
    assert tight.checkpointed and tight.predicted_peak_bytes <= tight.budget_bytes
    assert "checkpointed" in str(tight) and "step time" in str(tight)
    with pytest.raises(MemoryError, match=r"bn='exact' does not fit: .* peaked at .* budget of .* bn='two_pass'"):
        wrapped(model, "exact", ce, memory_budget=int(0.3 * peak)).tune(x, y)


def test_auto_runs_the_whole_batch_where_it_fits_and_two_pass_where_nothing_does():
    torch.manual_seed(0)
    model = ResidualNet(blocks=2).double()
    x, y = data()
    roomy = wrapped(model, "auto", ce, memory_budget=10**10)
    assert roomy.tune(x, y).bn == "exact" and roomy.plan.splits == [16]
    peak = roomy.plan.candidates[0].peak_bytes
    tight = wrapped(model, "auto", ce, memory_budget=int(0.5 * peak))
    plan = tight.tune(x, y)
    assert plan.bn == "two_pass" and plan.micro_batch < 16 and plan.candidates[-1].exact is False
    assert tight.step(x, y) > 0


def test_exact_plans_its_own_micro_batch_and_auto_at_a_given_one_is_precise_two_pass():
    model = ResidualNet(blocks=1)
    with pytest.raises(ValueError, match="bn='exact' plans its own micro-batch"):
        autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, ce, bn="exact", micro_batch=4)
    for bn in ("auto", autobatch.Auto()):
        ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, ce, bn=bn, micro_batch=4)
        assert ab.options.bn == autobatch.TwoPass(phase1_memory_format=torch.preserve_format, precise=None)


def test_out_of_memory_in_an_exact_step_is_a_clear_error_and_auto_falls_back_to_two_pass():
    torch.manual_seed(0)
    model = ResidualNet(blocks=2).double()
    x, y = data()
    failures = []

    def loss_fn(outputs, targets):
        if failures:
            raise failures.pop()
        return ce(outputs, targets)

    exact = wrapped(model, "exact", loss_fn, memory_budget=10**10)
    exact.tune(x, y)
    failures.append(torch.OutOfMemoryError("CUDA out of memory (injected)"))
    with pytest.raises(MemoryError, match="bn='exact' ran out of memory with the whole batch"):
        exact.step(x, y)
    auto = wrapped(model, "auto", loss_fn, memory_budget=10**10)
    auto.tune(x, y)
    failures.append(torch.OutOfMemoryError("CUDA out of memory (injected)"))
    auto.step(x, y)
    assert auto.plan.bn == "two_pass" and auto.plan.micro_batch < 16


def test_the_cache_keeps_the_chosen_policy(tmp_path):
    torch.manual_seed(0)
    model = ResidualNet(blocks=2).double()
    x, y = data()

    def wrap(budget):
        return wrapped(model, "exact", ce, cache=tmp_path, memory_budget=budget)

    peak = wrap(10**10).tune(x, y).candidates[0].peak_bytes
    budget = int(0.95 * peak / 0.9)
    measured = wrap(budget).tune(x, y)
    cached = wrap(budget).tune(x, y)
    assert cached.source == "cache" and cached.checkpointing == measured.checkpointing
    assert cached.bn == "exact" and cached.checkpointed


def test_a_compiled_model_runs_the_whole_batch_without_checkpointing():
    """Compiled, a checkpointed BatchNorm fails in backward (its counter's in-place update): the planner
    measures no checkpointing for a compiled model, and the compiled exact step is the eager one."""
    from tests.common import compiled

    torch.manual_seed(0)
    model = ResidualNet(blocks=2).double()
    assert [policy.label for policy in candidates(compiled(copy.deepcopy(model), []))] == ["none"]
    x, y = data()
    eager, graphs = copy.deepcopy(model), []
    compiled_model = copy.deepcopy(model)
    runs = []
    for module, wrapped_model in ((eager, eager), (compiled_model, compiled(compiled_model, graphs))):
        ab = autobatch.wrap(wrapped_model, torch.optim.SGD(module.parameters(), lr=0.1), 16, ce, bn="exact",
                            memory_budget=10**10)
        runs.append([ab.step(x, y) for _ in range(2)])
        assert ab.plan.checkpointed == ()
    assert runs[0] == pytest.approx(runs[1], rel=1e-12) and graphs
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_model.state_dict()[key], value, rtol=1e-10, atol=1e-12, msg=key)


def test_autocast_and_grad_scaler_give_the_full_batch_step():
    torch.manual_seed(0)
    model = ResidualNet(blocks=2)
    x, y = (t.float() if t.is_floating_point() else t for t in data())
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ce(reference(x), y)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, ce, bn="exact",
                        memory_budget=10**10, autocast_dtype=torch.bfloat16,
                        scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    ab.tune(x, y)
    ab.plan = ab.plan.replace(checkpointing=candidates(model)[1])
    assert ab.step(x, y) == pytest.approx(loss.item(), rel=1e-6)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_skip_connections_across_blocks():
    """The demo U-Net: encoder outputs cross to the decoder around the checkpointed blocks."""
    from autobatch.demo import UNet

    torch.manual_seed(0)
    model = UNet(width=4).double()
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 2, (8, 16, 16))
    for policy in candidates(model)[1:3]:
        assert_equal_to_full_batch(model, x, y, policy)


def test_a_policy_that_breaks_on_an_in_place_layer_is_left_out():
    """A module whose input the model changes in place cannot be checkpointed: the planner skips it."""
    class InPlaceHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = ResidualNet(blocks=4, classes=8)
            self.head = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(8, 5))

        def forward(self, x):
            return self.head(self.body(x).view(len(x), -1))

    torch.manual_seed(0)
    model = InPlaceHead().double()
    x, y = data(size=24)  # activations, not the update, make the peak
    ab = wrapped(model, "exact", memory_budget=10**10)
    peak = ab.tune(x, y).candidates[0].peak_bytes
    tight = wrapped(model, "exact", memory_budget=int(0.99 * peak / 0.9))
    plan = tight.tune(x, y)
    failed = [c.label for c in plan.candidates if "fails" in c.label]
    assert failed and "head" not in plan.checkpointed
    assert tight.step(x, y) > 0
