import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autobatch
from autobatch.reference import (
    cosine,
    flat_grad,
    frozen_statistics_grad,
    full_batch_grad,
    plain_accumulation_grad,
    relative_error,
)
from autobatch.split import balanced_splits
from tests.common import Flat, ResidualNet, assert_same_state, compiled, data, mlp, model_state, variants

ce = nn.CrossEntropyLoss()


def step_grad(model, x, y, micro_batch, loss_fn=ce, **options):
    """The gradient autobatch accumulates for one logical batch, and the loss it returns."""
    captured = {}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ab = autobatch.wrap(model, opt, len(x), loss_fn, micro_batch=micro_batch,
                        before_step=lambda ab: captured.setdefault("grad", flat_grad(ab.model)), **options)
    loss = ab.step(x, y)
    return captured["grad"], loss


# -- accumulation without BatchNorm: exact -------------------------------------------------------

@pytest.mark.parametrize("micro_batch", [1, 3, 4, 7, 16])
def test_no_bn_gradient_is_exact_with_uneven_splits(micro_batch):
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    grad, loss = step_grad(copy.deepcopy(model), x, y, micro_batch)
    assert relative_error(grad, full_batch_grad(model, x, y, ce)) < 1e-10
    assert loss == pytest.approx(ce(model(x), y).item(), rel=1e-12)


def test_one_optimizer_step_and_parameters_of_the_full_batch_step():
    torch.manual_seed(0)
    model = mlp().double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    steps = []
    opt.register_step_post_hook(lambda *args: steps.append(1))
    autobatch.wrap(model, opt, 16, ce, micro_batch=7).step(x, y)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    ce(reference(x), y).backward()
    ref_opt.step()
    assert steps == [1]
    for p, q in zip(model.parameters(), reference.parameters()):
        assert relative_error(p, q) < 1e-12
        assert p.grad is None  # zeroed once per logical batch, after the step


def test_last_short_batch():
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(11, 6, dtype=torch.float64), torch.randint(0, 3, (11,))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    captured = {}
    ab = autobatch.wrap(model, opt, 16, ce, micro_batch=4,
                        before_step=lambda ab: captured.setdefault("grad", flat_grad(ab.model)))
    ab.step(x, y)
    assert relative_error(captured["grad"], full_batch_grad(model, x, y, ce)) < 1e-10


def test_compute_loss_with_nested_batches():
    torch.manual_seed(0)
    model = mlp().double()
    batch = {"x": torch.randn(10, 6, dtype=torch.float64), "y": (torch.randint(0, 3, (10,)), "tag"),
             "w": [torch.rand(10, dtype=torch.float64)]}

    def compute_loss(model, b):
        assert b["y"][1] == "tag"
        per_sample = F.cross_entropy(model(b["x"]), b["y"][0], reduction="none")
        return (per_sample * b["w"][0]).mean()

    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    captured = {}
    ab = autobatch.wrap(model, opt, 10, compute_loss=compute_loss, micro_batch=3,
                        before_step=lambda ab: captured.setdefault("grad", flat_grad(ab.model)))
    loss = ab.step(batch)
    reference = copy.deepcopy(model)
    expected = compute_loss(reference, batch)
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-12)
    assert relative_error(captured["grad"], flat_grad(reference)) < 1e-10


def test_gradient_clipping_once_per_logical_batch():
    torch.manual_seed(0)
    model = mlp().double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, 6, dtype=torch.float64) * 10, torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    autobatch.wrap(model, opt, 16, ce, micro_batch=5, max_grad_norm=0.1).step(x, y)
    ce(reference(x), y).backward()
    assert flat_grad(reference).norm() > 0.1  # clipping does act
    nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    torch.optim.SGD(reference.parameters(), lr=1.0).step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert relative_error(p, q) < 1e-10


def test_grad_scaler_unscales_before_clipping_and_steps_once():
    torch.manual_seed(0)
    model = mlp().double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    seen = []
    autobatch.wrap(model, opt, 16, ce, micro_batch=5, scaler=scaler, max_grad_norm=1e3,
                   before_step=lambda ab: seen.append(flat_grad(ab.model).clone())).step(x, y)
    ce(reference(x), y).backward()
    assert relative_error(seen[0], flat_grad(reference)) < 1e-10  # unscaled when the hook sees it
    torch.optim.SGD(reference.parameters(), lr=1.0).step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert relative_error(p, q) < 1e-10


# -- two_pass BatchNorm: the full-batch forward and running statistics --------------------------

def bn_outputs(model, inputs=False):
    """Collects every BatchNorm layer's outputs (or ``inputs``) from grad-enabled forwards (the
    micro-batches; not phase 1)."""
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_hook(
                lambda m, i, o, name=name: seen.setdefault(name, []).append((i[0] if inputs else o).detach())
                if torch.is_grad_enabled() else None)
    return seen


@pytest.mark.parametrize("momentum", [0.1, None])
def test_two_pass_forward_and_running_statistics_equal_the_full_batch(momentum):
    torch.manual_seed(0)
    model = ResidualNet(blocks=2).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
            m.num_batches_tracked.fill_(3)
    full, micro = copy.deepcopy(model), copy.deepcopy(model)
    x, y = torch.randn(16, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (16,))
    full_out, micro_out = bn_outputs(full), bn_outputs(micro)
    full_loss = ce(full(x), y).item()
    opt = torch.optim.SGD(micro.parameters(), lr=0.0)
    loss = autobatch.wrap(micro, opt, 16, ce, micro_batch=5).step(x, y)
    assert loss == pytest.approx(full_loss, rel=1e-10)
    assert full_out.keys() == micro_out.keys() and len(full_out) == 5
    for name in full_out:
        assert len(micro_out[name]) == 4  # one per micro-batch: [4, 4, 4, 4]
        assert relative_error(torch.cat(micro_out[name]), full_out[name][0]) < 1e-10, name
    for key, value in full.state_dict().items():
        assert key in micro.state_dict()
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(micro.state_dict()[key], value, rtol=1e-10, atol=1e-12, msg=key)


def test_two_pass_gradient_is_close_to_the_full_batch_and_beats_the_alternatives():
    """Cosine to the true gradient, 9 BN layers, logical batch 16 in 4 splits, 5 seeds (float64)."""
    ours, plain, frozen = [], [], []
    for seed in range(5):
        torch.manual_seed(seed)
        model = ResidualNet(blocks=4).double()
        assert len([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]) == 9
        x, y = torch.randn(16, 3, 12, 12, dtype=torch.float64), torch.randint(0, 5, (16,))
        splits = balanced_splits(16, 4)
        reference = full_batch_grad(model, x, y, ce)
        ours.append(cosine(step_grad(copy.deepcopy(model), x, y, 4)[0], reference))
        plain.append(cosine(plain_accumulation_grad(model, x, y, ce, splits), reference))
        frozen.append(cosine(frozen_statistics_grad(model, x, y, ce, splits), reference))
    mean = lambda values: sum(values) / len(values)
    assert min(ours) >= 0.93, ours
    assert mean(ours) > mean(plain) + 0.01, (ours, plain)
    assert all(o > p for o, p in zip(ours, plain)), (ours, plain)
    assert mean(frozen) < 0.7 and mean(ours) > mean(frozen) + 0.3, (ours, frozen)


class BiasedConvNet(nn.Module):
    """Convs with a bias right before each BatchNorm, and a BatchNorm1d head: the full batch's
    gradient of every such bias is exactly zero (BatchNorm removes any constant shift of its input)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6, 8)
        self.bn3 = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(x)))
        return self.fc2(F.relu(self.bn3(self.fc1(x.mean((2, 3))))))


@pytest.mark.parametrize("micro_batch", [2, 3, 5])
def test_two_pass_keeps_batch_norm_shift_invariance(micro_batch):
    """Per channel, every BatchNorm's input gradient sums to zero over the logical batch, as in the
    full batch, and a bias right before a BatchNorm gets no gradient (float64)."""
    torch.manual_seed(0)
    model = BiasedConvNet().double()
    x, y = torch.randn(16, 3, 5, 5, dtype=torch.float64) * 2 + 1, torch.randint(0, 5, (16,))
    sums = {}
    for name in ("bn1", "bn2", "bn3"):
        def hook(module, grad_input, grad_output, name=name):
            dims = [0] + list(range(2, grad_input[0].dim()))
            sums[name] = sums.get(name, 0) + grad_input[0].sum(dims)
        model.get_submodule(name).register_full_backward_hook(hook)
    reference = full_batch_grad(model, x, y, ce)
    grad, _ = step_grad(model, x, y, micro_batch)
    scale = reference.abs().max()
    for name, total in sums.items():
        assert total.abs().max() < 1e-12 * scale, (name, total)
    offset, biases = 0, {}
    for name, p in model.named_parameters():
        biases[name] = grad[offset:offset + p.numel()]
        offset += p.numel()
    for name in ("conv1.bias", "conv2.bias", "fc1.bias"):
        assert biases[name].abs().max() < 1e-12 * scale, (name, biases[name])
    assert biases["conv1.weight"].abs().max() > 1e-3 * scale


def test_micro_mode_is_plain_accumulation_with_running_statistics_committed_once():
    """Gradient of plain accumulation; each layer's running statistics updated once, from the
    statistics of everything it saw in the logical batch (its inputs over all micro-batches)."""
    torch.manual_seed(0)
    model = ResidualNet(blocks=1).double()
    x, y = torch.randn(16, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (16,))
    seen = copy.deepcopy(model)
    inputs = {}
    for name, module in seen.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            module.register_forward_pre_hook(lambda m, i, name=name: inputs.setdefault(name, []).append(i[0]))
    plain = plain_accumulation_grad(seen, x, y, ce, [6, 5, 5])
    micro = copy.deepcopy(model)
    grad, _ = step_grad(micro, x, y, 6, bn="micro")
    assert relative_error(grad, plain) < 1e-10
    for name, parts in inputs.items():
        everything = torch.cat(parts[-3:])  # the last three forwards: plain accumulation's micro-batches
        layer = micro.get_submodule(name)
        assert layer.num_batches_tracked.item() == 1
        torch.testing.assert_close(layer.running_mean, 0.1 * everything.mean((0, 2, 3)), rtol=1e-10, atol=0)
        torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * everything.var((0, 2, 3)), rtol=1e-10, atol=0)


@pytest.mark.parametrize("bn", ["two_pass", "micro"])
@pytest.mark.parametrize("name, norm, shape", list(variants()), ids=[v[0] for v in variants()])
def test_batch_norm_variants_behave_as_the_full_batch(name, norm, shape, bn):
    torch.manual_seed(0)
    model = Flat(norm).double()
    if name != "eval-mode" and norm.running_mean is not None:
        norm.running_mean.uniform_(-1, 1)
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 1
    y = torch.randn(*shape, dtype=torch.float64)
    mse = nn.MSELoss()
    full = copy.deepcopy(model)
    full_loss = mse(full(x), y)
    full_loss.backward()
    micro = copy.deepcopy(model)
    keys = list(micro.state_dict())
    grad, loss = step_grad(micro, x, y, 5, loss_fn=mse, bn=bn)
    if bn == "two_pass" or not norm.training and norm.track_running_stats:
        assert loss == pytest.approx(full_loss.item(), rel=1e-10)
    assert list(micro.state_dict()) == keys
    for key, value in full.state_dict().items():
        torch.testing.assert_close(micro.state_dict()[key], value, rtol=1e-10, atol=1e-12, msg=key)
    assert cosine(grad, flat_grad(full)) > 0.5


def test_eval_mode_batch_norm_gives_the_exact_gradient():
    torch.manual_seed(0)
    model = ResidualNet(blocks=1).double().eval()
    x, y = torch.randn(16, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (16,))
    grad, _ = step_grad(copy.deepcopy(model), x, y, 5)
    assert relative_error(grad, full_batch_grad(model, x, y, ce)) < 1e-10


def test_phase_one_stops_after_the_last_batch_norm():
    torch.manual_seed(0)
    model = ResidualNet(blocks=1)
    heads = []
    model.fc.register_forward_hook(lambda *args: heads.append(torch.is_grad_enabled()))
    # The memory-format trial's forwards are tests/test_layout.py's.
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, ce, micro_batch=4,
                        bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format))
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    ab.step(x, y)
    assert heads == [False, True, True]  # first step: phase 1 runs to the end to count the calls
    heads.clear()
    ab.step(x, y)
    assert heads == [True, True]


def test_tiny_micro_batches_are_reported(caplog):
    model = ResidualNet(blocks=1)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, ce, micro_batch=2, bn="two_pass")
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        ab.step(torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,)))
        ab.step(torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,)))
    assert caplog.text.count("two_pass with micro-batches of 2 samples") == 1


def test_few_values_per_channel_are_reported_once_in_one_line(caplog):
    model = ResidualNet(blocks=1, head_norm=True)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, ce, micro_batch=4, bn="two_pass")
    with caplog.at_level(logging.INFO, logger="autobatch"):
        for _ in range(3):
            ab.step(torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,)))
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "1 BatchNorm layer sees fewer than 32 values per channel" in warnings[0].getMessage()
    assert "'head_bn', 4" in warnings[0].getMessage()
    details = [record.getMessage() for record in caplog.records if "values per channel in a micro-batch:" in
               record.getMessage()]
    assert details == ["autobatch: values per channel in a micro-batch: head_bn (4)"]
    assert "blocks" not in caplog.text  # 4 samples x 36 positions is enough


def test_bfloat16_autocast_on_cpu():
    torch.manual_seed(0)
    model = ResidualNet(blocks=1)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 5, (16,))
    full = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full_loss = ce(full(x), y).item()
    micro = copy.deepcopy(model)
    grad, loss = step_grad(micro, x, y, 4, autocast_dtype=torch.bfloat16)
    assert loss == pytest.approx(full_loss, rel=2e-2)
    assert cosine(grad, full_batch_grad(model, x, y, ce)) > 0.9
    torch.testing.assert_close(micro.bn.running_mean, full.bn.running_mean, rtol=2e-2, atol=2e-3)
    assert micro.bn.num_batches_tracked.item() == 1


# -- torch.compile ---------------------------------------------------------------------------

@pytest.mark.parametrize("options, in_place", [({"bn": "two_pass"}, False), ({"bn": "micro"}, False),
                                               ({"bn": "two_pass"}, True)],
                         ids=["two_pass", "micro", "model.compile()"])
@pytest.mark.slow
def test_a_compiled_model_trains_as_the_model_itself(options, in_place):
    torch.manual_seed(0)
    model = ResidualNet(blocks=2).double()
    other = copy.deepcopy(model)
    batches = [(torch.randn(16, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (16,))) for _ in range(3)]

    def train(module, parameters):
        ab = autobatch.wrap(module, torch.optim.SGD(parameters, lr=0.1, momentum=0.9), 16, ce, micro_batch=6,
                            **options)
        return [ab.step(x, y) for x, y in batches]

    graphs = []
    losses = train(compiled(other, graphs, in_place), other.parameters())
    assert graphs
    assert losses == pytest.approx(train(model, model.parameters()), rel=1e-12)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, rtol=1e-12, atol=1e-14, msg=key)


@pytest.mark.slow
def test_a_compiled_two_pass_step_compiles_in_the_first_step_only():
    # Phase 1 runs to the end of the forward under torch.compile: stopping it with an exception after
    # the last BatchNorm made dynamo give up on the traced forward and compile the BatchNorm calls
    # apart, at every step until its recompile limit (13 graphs after two steps, instead of 4).
    torch.manual_seed(0)
    model = ResidualNet(blocks=2)
    graphs = []
    ab = autobatch.wrap(compiled(model, graphs), torch.optim.SGD(model.parameters(), lr=0.1), 16, ce,
                        micro_batch=6, bn="two_pass")
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 5, (16,))
    ab.step(x, y)
    first = len(graphs)
    for _ in range(3):
        ab.step(x, y)
    # Nothing that depends on a micro-batch's rows is read in the traced forward: no recompilation per
    # micro-batch either (6 graphs when the check against phase 1 sliced its rows there). 2 graphs since
    # the intercept is a torch-function mode, which dynamo traces (4 while F.batch_norm was patched).
    assert first == 2 and len(graphs) == first


# -- nothing left behind ---------------------------------------------------------------------

def test_state_dict_unchanged_and_nothing_patched():
    model = ResidualNet(blocks=1)
    keys = list(model.state_dict())
    original = F.batch_norm
    with autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, ce, micro_batch=3) as ab:
        ab.step(torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,)))
        assert F.batch_norm is original
    assert ab.unwrap() is model
    assert list(model.state_dict()) == keys
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="unwrapped"):
        ab.step(torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,)))


@pytest.mark.parametrize("bn", ["two_pass", "micro"])
@pytest.mark.parametrize("fail_at", [0, 2])
def test_exception_in_loss_fn_leaves_the_model_as_it_was(bn, fail_at):
    torch.manual_seed(0)
    model = ResidualNet(blocks=1)
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # gradients the user had: not lost
    calls = []

    def loss_fn(outputs, targets):
        calls.append(1)
        if len(calls) == fail_at + 1:
            raise KeyError("boom")
        return ce(outputs, targets)

    before = model_state(model)
    ab = autobatch.wrap(model, opt, 8, loss_fn, micro_batch=3, bn=bn)
    with pytest.raises(KeyError, match="boom"):
        ab.step(torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,)))
    assert F.batch_norm is torch.nn.functional.batch_norm
    assert_same_state(before, model_state(model))
    assert not opt.state


# -- bad input: a clear error, nothing changed -------------------------------------------------

@pytest.mark.parametrize("options, error, message", [
    ({"target_batch": 0}, ValueError, "target_batch must be a positive int"),
    ({"target_batch": 2.5}, ValueError, "target_batch must be a positive int"),
    ({"micro_batch": 0}, ValueError, "micro_batch must be 'auto' or a positive int"),
    ({"micro_batch": True}, ValueError, "micro_batch must be 'auto' or a positive int"),
    ({"bn": "frozen"}, ValueError, "not offered"),
    ({"bn": "sync"}, ValueError, "bn must be one of"),
    ({"loss_fn": None}, TypeError, "exactly one of loss_fn"),
    ({"compute_loss": lambda m, b: 0}, TypeError, "exactly one of loss_fn"),
    ({"max_grad_norm": -1}, ValueError, "max_grad_norm"),
    ({"autocast_dtype": "bf16"}, TypeError, "autocast_dtype"),
    ({"memory_budget": "lots"}, ValueError, "cannot read 'lots' as a memory size"),
    ({"memory_budget": 1.5}, ValueError, "fractional memory_budget"),
    ({"memory_budget": 0}, ValueError, "memory_budget must be positive"),
    ({"memory_budget": "4GiB", "micro_batch": 4}, ValueError, "memory_budget applies to micro_batch='auto'"),
    ({"grow_after": 0}, ValueError, "grow_after"),
])
def test_wrap_rejects_bad_arguments(options, error, message):
    model = mlp()
    arguments = {"target_batch": 8, "loss_fn": ce, **options}
    with pytest.raises(error, match=message):
        autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), **arguments)


def bad_batches():
    yield "disagreeing", (torch.randn(8, 6), torch.randint(0, 3, (7,))), "disagree on the number of samples"
    yield "empty", (torch.randn(0, 6), torch.randint(0, 3, (0,))), "empty"
    yield "too large", (torch.randn(9, 6), torch.randint(0, 3, (9,))), "at most 8 samples"


@pytest.mark.parametrize("name, batch, message", list(bad_batches()), ids=[b[0] for b in bad_batches()])
def test_step_rejects_bad_batches_before_any_change(name, batch, message):
    model = nn.Sequential(mlp(), nn.BatchNorm1d(3))
    before = model_state(model)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, ce, micro_batch=3)
    with pytest.raises(ValueError, match=message):
        ab.step(*batch)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("bad, error, message", [
    (lambda loss: loss.expand(3), ValueError, r"loss for micro-batch 0 is shape \(3,\), not a scalar"),
    (lambda loss: loss.item(), ValueError, "loss for micro-batch 0 is float"),
])
def test_non_scalar_loss_is_rejected(bad, error, message):
    model = nn.Sequential(mlp(), nn.BatchNorm1d(3))
    before = model_state(model)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8,
                        lambda out, y: bad(ce(out, y)), micro_batch=3)
    with pytest.raises(error, match=message):
        ab.step(torch.randn(8, 6), torch.randint(0, 3, (8,)))
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("bn", ["two_pass", "micro"])
def test_nan_loss_names_the_micro_batch_and_changes_nothing(bn):
    model = nn.Sequential(mlp(), nn.BatchNorm1d(3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    y_weights = torch.ones(8)
    y_weights[4] = float("nan")  # sample 4 lies in micro-batch 1 of [3, 3, 2]

    def loss_fn(outputs, batch):
        targets, weights = batch
        return (F.cross_entropy(outputs, targets, reduction="none") * weights).mean()

    before = model_state(model)
    opt = torch.optim.Adam(model.parameters())
    ab = autobatch.wrap(model, opt, 8, loss_fn, micro_batch=3, bn=bn)
    with pytest.raises(FloatingPointError, match=r"micro-batch 1 \(samples 3:6 of the logical batch\) is nan"):
        ab.step(x, (y, y_weights))
    assert_same_state(before, model_state(model))
    assert not opt.state


def test_a_non_finite_input_sample_is_named_under_two_pass():
    """Phase 1's statistics carry one sample's NaN into every micro-batch: the error names the sample."""
    torch.manual_seed(0)
    model = ResidualNet(blocks=1)
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    x[5, 1, 2, 3] = float("nan")
    before = model_state(model)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, ce, micro_batch=3)
    with pytest.raises(FloatingPointError, match=r"micro-batch 0 .* is nan; samples \[5\] of the logical batch"):
        ab.step(x, y)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("bn", ["two_pass", "micro"])
def test_a_non_finite_gradient_never_reaches_the_optimizer(bn):
    torch.manual_seed(0)
    model = ResidualNet(blocks=1)

    def loss_fn(outputs, targets):
        # Finite (the square root of 0) with a gradient that is not (0 times infinity).
        return ce(outputs, targets) + (model.fc.bias - model.fc.bias.detach()).abs().sqrt().sum()

    before = model_state(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ab = autobatch.wrap(model, opt, 8, loss_fn, micro_batch=3, bn=bn)
    with pytest.raises(FloatingPointError, match="accumulated gradient .* norm (nan|inf) .* no optimizer step"):
        ab.step(torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,)))
    assert_same_state(before, model_state(model))
    assert not opt.state


class NaNWriting(torch.optim.SGD):
    """An optimizer whose step writes a NaN into the first parameter after updating (an overflow in its maths)."""

    def step(self, closure=None):
        super().step(closure)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")


@pytest.mark.parametrize("bn", ["two_pass", "micro"])
def test_an_update_that_writes_nan_is_put_back_and_reported(bn):
    torch.manual_seed(0)
    model = ResidualNet(blocks=1)
    before = model_state(model)
    opt = NaNWriting(model.parameters(), lr=0.1, momentum=0.9)
    ab = autobatch.wrap(model, opt, 8, ce, micro_batch=3, bn=bn, cache=False)
    with pytest.raises(FloatingPointError, match="update made 1 parameter tensor.* NaN or infinite .* put back"):
        ab.step(torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,)))
    assert_same_state(before, model_state(model))
    assert not opt.state


def test_an_optimizer_over_other_parameters_is_refused():
    model, other = mlp(), mlp()
    with pytest.raises(ValueError, match="the optimizer holds none of the model's parameters"):
        autobatch.wrap(model, torch.optim.SGD(other.parameters(), lr=0.1), 8, ce)


def test_parameters_left_out_of_the_optimizer_are_reported(caplog):
    model = mlp()
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        autobatch.wrap(model, torch.optim.SGD(model[0].parameters(), lr=0.1), 8, ce)
    assert "2 of the model's parameters that require grad are in no optimizer param group (2.weight, 2.bias)" \
        in caplog.text
    caplog.clear()
    model[2].requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        autobatch.wrap(model, torch.optim.SGD(model[0].parameters(), lr=0.1), 8, ce)
    assert caplog.text == ""


def test_a_sample_whose_activations_overflow_in_phase_one_is_named():
    """Finite inputs, but one sample's activations overflow before a BatchNorm: phase 1 names the
    layer and the sample, not micro-batch 0 alone."""
    class Overflowing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 8)
            self.bn = nn.BatchNorm1d(8)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.bn(self.fc(x).exp()))  # exp(1000) is infinite

    torch.manual_seed(0)
    model = Overflowing()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[:, 0] = 1.0
    x[6, 0] = 1000.0
    before = model_state(model)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, ce, micro_batch=3)
    with pytest.raises(FloatingPointError, match=r"input of BatchNorm layer 'bn' is NaN or infinite for samples \[6\]"):
        ab.step(x, y)
    assert_same_state(before, model_state(model))


def test_a_loss_without_grad_names_the_problem_and_changes_nothing():
    torch.manual_seed(0)
    model = ResidualNet(blocks=1).double()
    before = model_state(model)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, cache=False, micro_batch=8,
                        loss_fn=lambda outputs, targets: nn.functional.cross_entropy(outputs.detach(), targets))
    with pytest.raises(RuntimeError, match="the loss does not require grad.*detached"):
        ab.step(*data(16))
    assert_same_state(before, model_state(model))


# -- the gradient as its own call ----------------------------------------------------------------

@pytest.mark.parametrize("bn, micro_batch", [(autobatch.TwoPass(precise=True), 5), ("exact", "auto"), ("micro", 4)])
def test_backward_leaves_what_step_hands_the_optimizer_and_takes_no_step(bn, micro_batch):
    torch.manual_seed(0)
    model = ResidualNet(blocks=1).double()
    x, y = data(16)
    stepped = copy.deepcopy(model)
    handed = []
    ab = autobatch.wrap(stepped, torch.optim.SGD(stepped.parameters(), lr=0.0), 16, ce, bn=bn, micro_batch=micro_batch,
                        cache=False, before_step=lambda ab: handed.append(flat_grad(ab.model)))
    step_loss = ab.step(x, y)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    before = model_state(model)
    ab = autobatch.wrap(model, optimizer, 16, ce, bn=bn, micro_batch=micro_batch, cache=False)
    loss = ab.backward(x, y)
    assert loss == pytest.approx(step_loss, rel=1e-12)
    assert relative_error(flat_grad(model), handed[0]) < 1e-12
    assert not optimizer.state  # no optimizer step
    for name, value in model.state_dict().items():
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(value, before[name]), name  # the parameters as they were
    assert int(model.bn.num_batches_tracked) == 1  # the logical batch, counted once


def test_backward_then_the_callers_step_equals_step():
    torch.manual_seed(0)
    model = ResidualNet(blocks=1).double()
    reference = copy.deepcopy(model)
    batches = [data(16, seed=seed) for seed in range(3)]
    ab = autobatch.wrap(reference, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9), 16, ce,
                        micro_batch=4, bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format))
    losses = [ab.step(x, y) for x, y in batches]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ab = autobatch.wrap(model, optimizer, 16, ce, micro_batch=4,
                        bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format))
    for (x, y), expected in zip(batches, losses):
        assert ab.backward(x, y) == expected
        optimizer.step()
        optimizer.zero_grad()
    assert_same_state(model_state(reference), model_state(model))


def test_backward_adds_to_the_gradients_held_as_loss_backward_does():
    """Two halves' backward calls before one step are the whole batch's gradient (a trainer's accumulation)."""
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, ce, micro_batch=3, cache=False)
    first, second = ab.backward(x[:8], y[:8]), ab.backward(x[8:], y[8:])
    assert (first + second) / 2 == pytest.approx(ce(model(x), y).item(), rel=1e-12)
    assert relative_error(flat_grad(model), 2 * full_batch_grad(copy.deepcopy(model), x, y, ce)) < 1e-12


def test_a_failed_backward_leaves_the_gradients_buffers_and_rng_as_before():
    torch.manual_seed(0)
    model = ResidualNet(blocks=1).double()
    x, y = data(16)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    before, grads = model_state(model), [p.grad.clone() for p in model.parameters()]
    calls = []

    def failing(outputs, targets):
        calls.append(1)
        if len(calls) == 3:
            raise KeyError("boom")
        return ce(outputs, targets)

    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, failing, micro_batch=4, cache=False)
    rng = torch.get_rng_state()
    with pytest.raises(KeyError, match="boom"):
        ab.backward(x, y)
    assert_same_state(before, model_state(model))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(torch.get_rng_state(), rng)


def test_backward_with_a_scaler_leaves_the_scaled_gradient_for_the_callers_unscale():
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, ce, micro_batch=4, scaler=scaler,
                        cache=False)
    ab.backward(x, y)
    expected = full_batch_grad(copy.deepcopy(model), x, y, ce)
    assert relative_error(flat_grad(model) / 1024.0, expected) < 1e-5
    optimizer = ab.optimizer
    scaler.unscale_(optimizer)
    assert relative_error(flat_grad(model), expected) < 1e-5
    scaler.step(optimizer)
    scaler.update()
