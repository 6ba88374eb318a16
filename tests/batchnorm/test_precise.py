"""precise.py: TwoPass(precise=True) gives the full batch's step exactly (float64, against the unsplit step).

Where the model draws random numbers, the reference is the full batch with the same masks: the
generator seeded alike before its forward and before the step, whose phase 1 draws them in the same order."""
import collections
import copy
import dataclasses
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autobatch
from autobatch.modes import Boundaries
from autobatch.demo.unet import UNet
from autobatch.reference import flat_grad, relative_error
from tests.common import AreaLaterNet, BatchNormAct2d, ResidualNet, StochasticNet, assert_same_state, data, model_state

PRECISE = autobatch.TwoPass(precise=True, phase1_memory_format=torch.preserve_format)
ce = nn.CrossEntropyLoss()


def recording(model, target_batch, bn=PRECISE, **options):
    """``model`` wrapped with SGD at lr 0 (ce as its loss unless ``compute_loss`` is given), and the list every
    step's accumulated gradient is added to, as the optimizer gets it."""
    grads = []
    if "compute_loss" not in options:
        options["loss_fn"] = ce
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0), target_batch, bn=bn, cache=False,
                        before_step=lambda ab: grads.append(flat_grad(ab.model)), **options)
    return ab, grads


def step_grad(model, batch, micro_batch, bn=PRECISE, seed=1, **options):
    """The accumulated gradient one autobatch step hands the optimizer, with the generator seeded at ``seed``."""
    ab, grads = recording(model, len(batch[0]), bn, micro_batch=micro_batch, **options)
    torch.manual_seed(seed)
    ab.step(*batch) if "compute_loss" not in options else ab.step(batch)
    return grads[0], ab


def full_grad(model, batch, loss=None, seed=1):
    torch.manual_seed(seed)
    (loss or (lambda m, b: ce(m(b[0]), b[1])))(model, batch).backward()
    return flat_grad(model)


class SharedOutput(nn.Module):
    """A BatchNorm output read by the next segment and by one three cuts later; in-place activations."""

    def __init__(self, channels=6):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(channels)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(3))
        self.bns = nn.ModuleList(BatchNormAct2d(channels) for _ in range(3))
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(channels, 5)

    def forward(self, x):
        early = self.bn0(self.stem(x))
        y = self.act(early.clone())
        for conv, bn in zip(self.convs, self.bns):
            y = bn(conv(y))
        y = y + early * 0.5  # read three cuts later
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("micro_batch", [2, 4, 5, 8])
def test_a_residual_network_with_a_batchnorm1d_head_gets_the_full_batch_gradient(micro_batch):
    torch.manual_seed(0)
    net = ResidualNet(blocks=3, channels=6, head_norm=True).double()
    batch = data(16, (3, 6, 6))
    expected = full_grad(copy.deepcopy(net), batch)
    got, ab = step_grad(copy.deepcopy(net), batch, micro_batch)
    assert len(ab.plan.splits) > 1
    assert relative_error(got, expected) < 1e-10


def three_momentum_steps(net, n, shape, after_first=lambda ab: None):
    """Three SGD momentum steps of ``net`` on batches of ``n`` samples of ``shape``, the whole batch's and
    autobatch's (precise, micro-batches of 4), their states compared; ``after_first(ab)`` between the first two."""
    reference, model = copy.deepcopy(net), copy.deepcopy(net)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), n, ce, micro_batch=4,
                        bn=PRECISE, cache=False)
    for seed in range(3):
        x, y = data(n, shape, seed=seed)
        opt_ref.zero_grad()
        ce(reference(x), y).backward()
        opt_ref.step()
        ab.step(x, y)
        if seed == 0:
            after_first(ab)
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-9, atol=1e-12), name
    return reference, model, ab


def test_running_statistics_and_three_momentum_steps_equal_the_full_batch():
    torch.manual_seed(0)
    reference, model, _ = three_momentum_steps(ResidualNet(blocks=2, channels=6, head_norm=True).double(), 16,
                                               (3, 6, 6))
    assert model.bn.num_batches_tracked.item() == 3
    assert "forward" not in model.__dict__ and model.state_dict().keys() == reference.state_dict().keys()


def test_dropout_and_stochastic_depth_are_replayed_in_every_segment():
    torch.manual_seed(0)
    net = StochasticNet(blocks=3).double()
    batch = data(16, (3, 6, 6))
    expected = full_grad(copy.deepcopy(net), batch, seed=7)
    got, _ = step_grad(copy.deepcopy(net), batch, 4, seed=7)
    assert relative_error(got, expected) < 1e-10


def test_skip_connections_of_a_u_net():
    torch.manual_seed(0)
    net = UNet(width=4).double()
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 2, (8, 16, 16))
    expected = full_grad(copy.deepcopy(net), (x, y))
    got, _ = step_grad(copy.deepcopy(net), (x, y), 2)
    assert relative_error(got, expected) < 1e-10


def test_a_batchnorm_output_read_several_cuts_later_and_layers_that_call_batch_norm_themselves():
    torch.manual_seed(0)
    net = SharedOutput().double()
    batch = data(12, (3, 5, 5))
    expected = full_grad(copy.deepcopy(net), batch)
    got, _ = step_grad(copy.deepcopy(net), batch, 3)
    assert relative_error(got, expected) < 1e-10


def test_frozen_batchnorm_layers_are_not_cut_and_stay_frozen():
    torch.manual_seed(0)
    net = ResidualNet(blocks=2, channels=6).double()
    net.blocks[0].bn1.eval()
    batch = data(16, (3, 6, 6))
    reference = copy.deepcopy(net)
    expected = full_grad(reference, batch)
    model = copy.deepcopy(net)
    got, _ = step_grad(model, batch, 4)
    assert relative_error(got, expected) < 1e-10
    assert torch.equal(model.blocks[0].bn1.running_mean, net.blocks[0].bn1.running_mean)
    assert torch.allclose(model.bn.running_var, reference.bn.running_var, rtol=1e-12)


def test_compute_loss_with_a_dict_output_and_a_count_weighted_loss():
    class Segmenter(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
            self.out, self.aux = nn.Conv2d(6, 3, 1), nn.Conv2d(6, 3, 1)

        def forward(self, x):
            features = self.body(x)
            return {"out": self.out(features), "aux": self.aux(features)}

    def pixel_loss(model, batch):
        x, y = batch
        out = model(x)
        total = F.cross_entropy(out["out"], y, ignore_index=-1, reduction="sum") + \
            0.5 * F.cross_entropy(out["aux"], y, ignore_index=-1, reduction="sum")
        return total, (y != -1).sum()

    torch.manual_seed(0)
    net = Segmenter().double()
    x = torch.randn(12, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(-1, 3, (12, 6, 6))
    reference = copy.deepcopy(net)
    total, count = pixel_loss(reference, (x, y))
    (total / count).backward()
    got, _ = step_grad(copy.deepcopy(net), (x, y), 5, compute_loss=pixel_loss)
    assert relative_error(got, flat_grad(reference)) < 1e-10


def test_a_model_torch_fx_cannot_trace_trains_as_two_pass_and_says_so_once(caplog):
    class Branchy(ResidualNet):
        def forward(self, x):
            if x.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace it
                return super().forward(x)
            return super().forward(-x)

    torch.manual_seed(0)
    net = Branchy(blocks=2, channels=6).double()
    batch = data(16, (3, 6, 6))
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        got, ab = step_grad(copy.deepcopy(net), batch, 4)
        ab.step(*batch)
    said = [r.getMessage() for r in caplog.records if "precise=True" in r.getMessage()]
    assert len(said) == 1 and "torch.fx cannot trace" in said[0] and "projected backward" in said[0]
    plain, _ = step_grad(copy.deepcopy(net), batch, 4, bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format))
    assert torch.equal(got, plain)


def test_a_loss_that_calls_the_model_twice_trains_as_two_pass(caplog):
    def twice(model, batch):
        return ce(model(batch[0]), batch[1]) + 0.1 * model(batch[0]).square().mean()

    torch.manual_seed(0)
    net = ResidualNet(blocks=1, channels=6).double()
    batch = data(16, (3, 6, 6))
    model = copy.deepcopy(net)
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        got, _ = step_grad(model, batch, 4, compute_loss=twice)
    assert any("calls the model more than once" in r.getMessage() for r in caplog.records)
    # the graph's phase 1 was undone before two_pass's own: the same step, running statistics included
    plain = copy.deepcopy(net)
    expected, _ = step_grad(plain, batch, 4, compute_loss=twice,
                            bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format))
    assert torch.equal(got, expected)
    assert_same_state(model_state(plain), model_state(model))


def test_an_operation_that_mixes_samples_between_cuts_is_refused_and_the_model_is_unchanged():
    class Mixing(ResidualNet):
        def forward(self, x):
            x = F.relu(self.bn(self.stem(x)))
            x = x - x.mean(0, keepdim=True).expand_as(x)  # each sample depends on the others
            return self.fc(self.blocks(x).mean((2, 3)))

    torch.manual_seed(0)
    net = Mixing(blocks=1, channels=6).double()
    before = model_state(net)
    x, y = data(16, (3, 6, 6))
    ab = autobatch.wrap(net, torch.optim.SGD(net.parameters(), lr=0.1), 16, ce, micro_batch=4, bn=PRECISE, cache=False)
    with pytest.raises(RuntimeError, match="phase 1's for the same samples"):
        ab.step(x, y)
    assert_same_state(before, model_state(net))


def test_settings_are_checked():
    with pytest.raises(TypeError, match="precise must be True, False or None"):
        autobatch.TwoPass(precise="yes")


@pytest.mark.parametrize("bn", [PRECISE, autobatch.Auto(by_timing=True)], ids=["precise", "auto by timing"])
def test_planned_micro_batches_under_a_memory_budget_are_exact(bn, monkeypatch):
    """Planned by the memory model; bn=Auto(by_timing=True) splits with the exact backward where the whole batch
    does not pay (checkpointing made never fast enough for it, so that its choice does not hang on timings)."""
    monkeypatch.setattr("autobatch.planning.whole.AUTO_SLOWDOWN", 0.0)
    torch.manual_seed(0)
    net = ResidualNet(blocks=6, channels=8, head_norm=True).double()
    batch = data(32, (3, 12, 12))
    expected = full_grad(copy.deepcopy(net), batch)
    ab, grads = recording(copy.deepcopy(net), 32, bn, memory_budget="6MiB")
    ab.step(*batch)
    assert ab.plan.bn == "two_pass" and len(ab.plan.splits) > 1
    assert relative_error(grads[0], expected) < 1e-10
    # The segment backward was measured apart: the next plan's peak holds it, within the budget.
    backward = ab._planner.state.model.backwards[ab.plan.sample_size]
    ab.step(*batch)
    assert ab.plan.predicted_peak_bytes >= backward and backward <= ab.plan.budget_bytes
    assert relative_error(grads[1], expected) < 1e-10


def test_a_segment_backward_over_the_budget_hands_that_size_to_the_projected_backward(caplog):
    """#38: the segment backward holds whole-batch tensors whatever the micro-batch, and had passed the budget
    unseen (1.06x on this model at 3 MiB). Now the step that finds it stops at the budget, is redone with the
    projected backward, and later batches of that size are planned so (the plan says why)."""
    torch.manual_seed(0)
    net = ResidualNet(blocks=2, channels=8, head_norm=True).double()
    batches = [data(32, (3, 12, 12), seed=seed) for seed in (1, 2)]
    model, plain = copy.deepcopy(net), copy.deepcopy(net)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 32, ce, bn=PRECISE, cache=False,
                        memory_budget="3MiB")
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        for batch in batches:
            ab.step(*batch)
    assert sum("out of memory in precise's segment backward" in r.getMessage() for r in caplog.records) == 1
    assert "precise cannot run: its segment backward ran out of memory" in ab.plan.gradient
    projected = autobatch.wrap(plain, torch.optim.SGD(plain.parameters(), lr=0.1), 32, ce, cache=False,
                               micro_batch=ab.plan.micro_batch,
                               bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format))
    for batch in batches:
        projected.step(*batch)
    assert_same_state(model_state(plain), model_state(model))


def test_precise_where_it_can_run_is_the_default_of_auto_only():
    from autobatch.batchnorm import strategy_for
    from autobatch.batchnorm.precise import PreciseTwoPassStrategy

    net = ResidualNet(blocks=1).double()
    for mode, precise in ((autobatch.TwoPass(precise=None), True), (autobatch.TwoPass(), False)):
        ab = autobatch.wrap(net, torch.optim.SGD(net.parameters(), lr=0.1), 16, ce, micro_batch=4, bn=mode, cache=False)
        assert isinstance(ab._strategy, PreciseTwoPassStrategy) is precise
        assert isinstance(strategy_for(mode, ab._micro), PreciseTwoPassStrategy) is precise


def test_where_precise_cannot_run_the_step_is_handed_to_the_projected_two_pass_itself():
    """#40: precise is built around the plain two_pass strategy and hands it the step, rather than branching
    to its parent in each method."""
    from autobatch.batchnorm.strategy import Plain

    class Branchy(ResidualNet):
        def forward(self, x):
            return super().forward(x) if x.sum() > -1e9 else super().forward(-x)

    for net, handed in ((ResidualNet(blocks=1).double(), False), (Branchy(blocks=1).double(), True)):
        ab = autobatch.wrap(net, torch.optim.SGD(net.parameters(), lr=0.1), 16, ce, micro_batch=4,
                            bn=autobatch.TwoPass(precise=True), cache=False)
        ab.step(*data(16, (3, 6, 6)))  # the branch on values is found tracing on real inputs, in phase 1
        precise = ab._strategy
        assert (precise.for_step([4] * 4, 1) is precise.projected) is handed
        assert precise.for_step([4] * 4, 2) is precise.projected  # phase 1 in chunks: never precise
        assert isinstance(precise.for_step([16], 1), Plain)

# -- the default (#38): the full batch's exact gradient, and the plan says so ----------------------------

def default_step(model, batch, **options):
    """One step of ``wrap`` with no ``bn``, as the README's first example writes it; the gradient it took."""
    grads = []
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0), len(batch[0]), ce, cache=False,
                        before_step=lambda ab: grads.append(flat_grad(ab.model)), **options)
    ab.step(*batch)
    return ab, grads[0]


@pytest.mark.parametrize("options, gradient", [
    (dict(micro_batch=4), "precise: the full batch's exact gradient"),
    (dict(memory_budget=10**10), "exact: the whole batch in one piece"),
], ids=["given micro-batch", "the whole batch fits"])
def test_the_default_gives_the_unsplit_step_s_gradient_and_names_it(options, gradient):
    torch.manual_seed(0)
    net = ResidualNet(blocks=2, head_norm=True).double()
    batch = data(16, (3, 8, 8))
    expected = full_grad(copy.deepcopy(net), batch)
    ab, got = default_step(copy.deepcopy(net), batch, **options)
    assert ab.plan.gradient == gradient
    assert f"({gradient})" in str(ab.plan)
    assert relative_error(got, expected) < 1e-12


def test_where_precise_cannot_run_the_plan_says_the_projected_backward_and_why():
    class Branches(nn.Module):  # a branch on a value: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.net = ResidualNet(blocks=1)

        def forward(self, x):
            return self.net(x) if x.sum() > -1e9 else self.net(-x)

    ab, _ = default_step(Branches().double(), data(8, (3, 6, 6)), micro_batch=4)
    assert ab.plan.gradient.startswith("projected backward") and "precise cannot run: torch.fx" in ab.plan.gradient


@pytest.mark.slow
@pytest.mark.parametrize("how", ["torch.compile(model)", "model.compile()"])
def test_a_compiled_model_gets_the_exact_gradient_by_default(how):
    """#38: the graph is traced from the module torch.compile wraps (it had fallen back to the projected backward,
    "torch.fx cannot trace OptimizedModule's forward")."""
    torch.manual_seed(0)
    net = ResidualNet(blocks=2, head_norm=True).double()
    batch = data(16, (3, 8, 8))
    expected = full_grad(copy.deepcopy(net), batch)
    model = copy.deepcopy(net)
    if how == "model.compile()":
        model.compile()
        wrapped = model
    else:
        wrapped = torch.compile(model)
    ab, got = default_step(wrapped, batch, micro_batch=4)
    assert ab.plan.gradient.startswith("precise")
    assert relative_error(got, expected) < 1e-12


# -- never a stale graph (#38.3) ----------------------------------------------------------------

class Tempered(nn.Module):
    """A plain attribute read in forward (a temperature), a head, and a drop path's probability."""

    def __init__(self):
        super().__init__()
        self.body = ResidualNet(blocks=1, head_norm=True)
        self.temperature = 1.0

    def forward(self, x):
        return self.body(x) / self.temperature


def _change_temperature(model):
    model.temperature = 4.0


def _replace_head(model):
    torch.manual_seed(5)
    model.body.fc = nn.Linear(model.body.fc.in_features, model.body.fc.out_features).double()


def _freeze_first_layer(model):
    next(model.parameters()).requires_grad_(False)


@pytest.mark.parametrize("change", [_change_temperature, _replace_head, _freeze_first_layer],
                         ids=["plain attribute", "new head", "frozen parameter"])
def test_a_model_changed_after_its_first_step_is_captured_again(change, caplog):
    """Precise had traced once and kept the graph: after such a change it gave the old graph's loss and
    gradient (relative error 3.3, 1.1 and 4.5e-2 measured), with no warning. It must equal the unsplit step."""
    torch.manual_seed(0)
    model = Tempered().double()
    batch = data(16, (3, 8, 8))
    grads = []
    optimizer = torch.optim.SGD([p for p in model.parameters()], lr=0.0)
    ab = autobatch.wrap(model, optimizer, 16, ce, micro_batch=4, cache=False,
                        before_step=lambda ab: grads.append(flat_grad(ab.model)))
    ab.step(*batch)
    change(model)
    for p in model.parameters():
        if p not in {q for group in optimizer.param_groups for q in group["params"]}:
            optimizer.add_param_group({"params": [p]})
    with caplog.at_level(logging.INFO, logger="autobatch"):
        loss = ab.step(*batch)
    reference = copy.deepcopy(model)
    reference.zero_grad(set_to_none=True)
    expected_loss = ce(reference(batch[0]), batch[1])
    expected_loss.backward()
    assert relative_error(grads[-1], flat_grad(reference)) < 1e-12
    assert loss == pytest.approx(expected_loss.item(), rel=1e-12)
    assert "changed since its graph was captured" in caplog.text and ab.plan.gradient.startswith("precise")


def test_a_step_takes_the_models_fingerprint_once(monkeypatch):
    """The step's for_step compares the model with its graph; prepare took the fingerprint again (1.7% of a
    MobileNetV3 step on the CPU). Once per step, and a change between steps is still seen (the test above)."""
    from autobatch.batchnorm import precise
    torch.manual_seed(0)
    model = Tempered().double()
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, ce, micro_batch=4, cache=False)
    batch = data(16, (3, 8, 8))
    ab.step(*batch)
    taken = []
    real = precise.Fingerprint.of
    monkeypatch.setattr(precise.Fingerprint, "of", staticmethod(lambda model: taken.append(1) or real(model)))
    ab.step(*batch)
    assert len(taken) == 1 and ab.plan.gradient.startswith("precise")


def test_a_product_of_sizes_read_groups_later_gets_the_full_batch_gradient():
    """timm's lambda_resnet26t ended the default's step with a KeyError: the last group read H * W through a
    tensor of the first group's inner boundary, never refilled for it (tests/batchnorm/test_segment_layout.py)."""
    torch.manual_seed(0)
    model = AreaLaterNet().double()
    batch = data(16, (3, 5, 5), classes=3)
    expected = full_grad(copy.deepcopy(model), batch)
    got, ab = step_grad(copy.deepcopy(model), batch, 4, bn="auto")  # a first step keeps the grouped boundaries
    assert relative_error(got, expected) < 1e-12 and ab.plan.gradient.startswith("precise")


class AutocastOff(nn.Module):
    """timm's EfficientViT: a block kept out of autocast with ``torch.autocast(device_type=h.device.type,
    enabled=False)`` behind a check of the device, which torch.fx cannot trace symbolically."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.gate, self.bn2, self.head = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Linear(4, 5)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if h.device.type != "meta":
            with torch.autocast(device_type=h.device.type, enabled=False):
                h = h.to(self.gate.weight.dtype)  # out of autocast, in the weights' precision
                h = h * torch.sigmoid(self.gate(h))
        return self.head(self.bn2(h).relu().mean((2, 3)))


def test_a_forward_that_hands_on_a_tensors_device_gets_the_full_batch_gradient():
    """Traced on real inputs, ``h.device.type`` was a proxy that torch.autocast refused ("Expected `device_type` of
    type `str`"): timm efficientvit_b0 fell back to the projected backward. A tensor's device and dtype are read
    as real values now, the graph's constants."""
    torch.manual_seed(0)
    model = AutocastOff().double()
    batch = data(16, (3, 5, 5))
    expected = full_grad(copy.deepcopy(model), batch)
    got, ab = step_grad(copy.deepcopy(model), batch, 4, bn="auto")
    assert relative_error(got, expected) < 1e-12 and ab.plan.gradient.startswith("precise")


def test_a_forward_that_turns_autocast_off_under_the_steps_autocast_is_refused(caplog):
    """A graph holds no context manager: under the step's bfloat16 autocast it would run the block the model keeps
    in float32 in bfloat16. The projected backward runs, which calls the model itself, and says why."""
    torch.manual_seed(0)
    model = AutocastOff()
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, ce, micro_batch=4, cache=False,
                        autocast_dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        ab.step(*data(16, (3, 5, 5), dtype=torch.float32))
    assert "turns torch.autocast on or off inside" in ab.plan.gradient and ab.plan.gradient.startswith("projected")


class TokenNorm(nn.Module):
    """A BatchNorm1d over a transformer's tokens flattened into the first dimension, samples first (timm's LeViT:
    ``bn(x.flatten(0, 1)).reshape_as(x)``), dropout on the flattened tokens; or with ``samples_first=False`` the
    tokens first (``x.transpose(0, 1).flatten(0, 1)``): rows of one sample are then not together."""

    def __init__(self, tokens=5, width=6, samples_first=True):
        super().__init__()
        self.embed, self.mix = nn.Linear(3, width), nn.Linear(width, width)
        self.norms = nn.ModuleList(nn.BatchNorm1d(width) for _ in range(2))
        self.drop, self.head = nn.Dropout(0.3), nn.Linear(width, 5)
        self.tokens, self.samples_first = tokens, samples_first

    def forward(self, x):
        h = self.embed(x.view(x.shape[0], self.tokens, -1))
        for norm in self.norms:
            if self.samples_first:
                h = self.drop(norm(self.mix(h).flatten(0, 1))).reshape_as(h) + h
            else:
                flat = self.mix(h).transpose(0, 1).flatten(0, 1)
                h = norm(flat).view(self.tokens, h.shape[0], -1).transpose(0, 1) + h
        return self.head(h.mean(1))


class FoldedFrames(nn.Module):
    """A video's frames folded into the first dimension for 2-D layers, ``x.view(samples * frames, C, H, W)``, and
    unfolded for a temporal mean; a BatchNorm2d on the folded frames with dropout, and one per clip."""

    def __init__(self, frames=3):
        super().__init__()
        self.frames = frames
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.drop, self.clip_bn, self.head = nn.Dropout2d(0.3), nn.BatchNorm1d(6), nn.Linear(6, 5)

    def forward(self, x):
        samples = x.shape[0]
        h = x.view(samples * self.frames, 3, *x.shape[-2:])
        h = self.bn2(self.conv2(self.drop(self.bn(self.conv(h)).relu()))).relu()
        clip = h.mean((2, 3)).view(samples, self.frames, -1).mean(1)
        return self.head(self.clip_bn(clip))


@pytest.mark.parametrize("net, shape", [(TokenNorm, (15,)), (FoldedFrames, (3, 3, 5, 5))], ids=["tokens", "frames"])
def test_a_batch_norm_over_several_rows_per_sample_gets_the_full_batch_gradient(net, shape):
    """The default failed on timm's LeViT (a BatchNorm1d over the tokens flattened into the first dimension): precise
    refused "first dimension (128) is not the batch's samples (8)" and two_pass's check ended the step, 1.1 standard
    deviations off, because it compared phase 1's rows 0:4 (the first sample's tokens) with micro-batch 0's. Samples
    ``start:stop`` are rows ``start * k:stop * k`` of such a tensor (dropout masks replayed alike)."""
    torch.manual_seed(0)
    model = net().double()
    batch = data(16, shape)
    expected = full_grad(copy.deepcopy(model), batch, seed=3)
    got, ab = step_grad(copy.deepcopy(model), batch, 4, bn="auto", seed=3)
    assert relative_error(got, expected) < 1e-12 and ab.plan.gradient.startswith("precise")
    projected, ab = step_grad(copy.deepcopy(model), batch, 4, bn="two_pass", seed=3)
    assert 0 < relative_error(projected, expected) < 1 and ab.plan.gradient.startswith("projected")


def test_tokens_first_in_a_flattened_batch_norm_input_are_refused_with_the_model_unchanged():
    """With the tokens first, samples ``start:stop`` are not rows ``start * k:stop * k``: the recomputation differs
    from phase 1 and the step is refused, nothing changed, as any operation that mixes the samples is."""
    torch.manual_seed(0)
    model = TokenNorm(samples_first=False).double()
    before = model_state(model)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, ce, micro_batch=4, cache=False)
    with pytest.raises(RuntimeError, match="phase 1"):
        ab.step(*data(16, (15,)))
    assert_same_state(before, model_state(model))


class TransposedNorm(nn.Module):
    """A BatchNorm over a tensor whose first dimension is not the samples' (``bn(h.transpose(0, 2))``)."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn, self.out = nn.Linear(6, 6), nn.BatchNorm1d(4), nn.Linear(6, 3)

    def forward(self, x):
        h = self.lin(x.transpose(1, 2))
        return self.out(self.bn(h.transpose(0, 2)).transpose(0, 2).mean(1))


def test_a_batch_norm_over_a_transposed_tensor_is_named_not_a_shape_error(caplog):
    """#39: precise failed with PyTorch's "The expanded size of the tensor (4) must match..."; now it says which
    layer and why, and the step runs as two_pass, whose own check names the layer too."""
    torch.manual_seed(0)
    model = TransposedNorm().double()
    before = model_state(model)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, ce, micro_batch=4, bn=PRECISE)
    with caplog.at_level(logging.WARNING, logger="autobatch"), pytest.raises(RuntimeError, match="layer 'bn'"):
        ab.step(torch.randn(8, 6, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))
    assert "BatchNorm layer 'bn' normalizes a tensor whose first dimension (6) is not the batch's samples (8)" \
        in caplog.text
    assert_same_state(before, model_state(model))


# -- models torch.fx cannot trace symbolically, traced on real inputs (#38.2) ------------------------------

@dataclasses.dataclass
class Output(collections.OrderedDict):
    """A dict output of a class of its own, as transformers' ModelOutput is."""

    logits: torch.Tensor = None

    def __post_init__(self):
        self["logits"] = self.logits


class ShapeBranches(nn.Module):
    """Python that reads shapes: a check of the channels, "same" padding from the input's size (timm's
    Conv2dSame), a layer chosen by the image's size; and a ModelOutput-like output."""

    def __init__(self, channels=6):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, stride=2)
        self.bn0 = nn.BatchNorm2d(channels)
        self.small, self.large = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 5)

    def forward(self, x):
        if x.shape[1] != 3:
            raise ValueError("three channels, please")
        height, width = x.shape[-2:]
        pad_h = max((math.ceil(height / 2) - 1) * 2 + 3 - height, 0)
        pad_w = max((math.ceil(width / 2) - 1) * 2 + 3 - width, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        y = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1((self.small if y.size(-1) < 4 else self.large)(y)))
        return Output(logits=self.head(y.mean((2, 3))))


def output_loss(model, batch):
    return ce(model(batch[0]).logits, batch[1])


@pytest.mark.parametrize("size", [7, 5], ids=["large branch", "small branch"])
def test_a_forward_that_branches_on_shapes_gets_the_exact_gradient(size):
    with pytest.raises(Exception, match="control flow"):
        torch.fx.symbolic_trace(ShapeBranches())  # what the symbolic capture meets
    assert_exact_by_default(ShapeBranches(), output_loss, size)


def test_a_flag_passed_to_a_forward_traced_on_real_inputs_is_its_constant():
    """torch.fx makes a non-tensor argument a constant of the graph, checked by the graph: a call with another
    value than the default had been refused ("double has been specialized to have value True")."""
    class Flagged(ShapeBranches):
        def forward(self, x, double=False):
            logits = super().forward(x).logits
            return Output(logits=logits * 2 if double else logits)

    def doubled(model, batch):
        return ce(model(batch[0], double=True).logits, batch[1])

    assert_exact_by_default(Flagged(), doubled)


class TakesKeywords(ShapeBranches):
    """transformers' forwards: ``**kwargs`` beside the inputs, called without any."""

    def forward(self, x, labels=None, **kwargs):
        return super().forward(x)


def test_a_forward_that_takes_kwargs_and_is_called_without_them_is_traced_on_real_inputs(caplog):
    """Refused by the capture's check of starred arguments since the last stop's review (found by
    bench/fidelity_models.py: transformers' ResNet, RegNet, MobileNetV2 and EfficientNet had fallen back). An
    empty ``**kwargs`` is a constant of the graph; a call that fills it is refused, with the reason."""
    assert_exact_by_default(TakesKeywords(), output_loss)

    def filled(model, batch):
        return ce(model(batch[0], output_hidden_states=False).logits, batch[1])

    assert_trains_as_two_pass(TakesKeywords(), filled, "was called with values in its **kwargs", caplog)


def test_a_new_image_size_is_traced_again_and_stays_exact(caplog):
    torch.manual_seed(0)
    net = ShapeBranches().double()
    model, reference = copy.deepcopy(net), copy.deepcopy(net)
    grads = []
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, compute_loss=output_loss,
                        micro_batch=4, bn=PRECISE, cache=False, before_step=lambda ab: grads.append(flat_grad(ab.model)))
    assert ab.plan.gradient.endswith("once the first step has traced the model on its inputs")
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for size in (7, 5, 7):
        batch = data(16, (3, size, size), seed=size)
        ab.step(batch)
        expected = full_grad(reference, batch, loss=output_loss)
        optimizer.step()
        optimizer.zero_grad()
        assert relative_error(grads[-1], expected) < 1e-12
    assert ab.plan.gradient == "precise: the full batch's exact gradient"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_forward_whose_steps_depend_on_the_batch_size_trains_as_two_pass_and_says_why(caplog):
    class BySize(ShapeBranches):
        def forward(self, x):
            return super().forward(x if x.shape[0] > 2 else x * 2)

    assert_trains_as_two_pass(BySize(), output_loss, "traced on 2 and on 3 samples takes other steps", caplog)


class LossInside(ShapeBranches):
    """transformers' way: with labels, forward returns its loss beside the logits (a loss module made in forward)."""

    def forward(self, x, labels=None):
        logits = super().forward(x).logits
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.CrossEntropyLoss()(logits.view(-1, 5), labels.view(-1)), "logits": logits}


def inside(model, batch):
    return model(batch[0], labels=batch[1])["loss"]


def test_a_loss_inside_forward_gets_the_exact_gradient():
    """Each micro-batch computes the forward's loss on its rows of the logits phase 1 kept, as its own forward
    would have; the segment backward goes on from the logits."""
    assert_exact_by_default(LossInside(), inside)


def test_a_loss_inside_forward_on_what_it_does_not_return_trains_as_two_pass_and_says_why(caplog):
    class LossOnly(ShapeBranches):
        def forward(self, x, labels):
            return F.cross_entropy(super().forward(x).logits, labels)

    def loss_only(model, batch):
        return model(batch[0], batch[1])

    assert_trains_as_two_pass(LossOnly(), loss_only, "return the logits too", caplog)


def assert_exact_by_default(module, compute_loss, size=7):
    """A step at micro-batches of 4 runs precise on ``module`` and gives the unsplit step's gradient (float64)."""
    torch.manual_seed(0)
    net = module.double()
    batch = data(16, (3, size, size))
    expected = full_grad(copy.deepcopy(net), batch, loss=compute_loss)
    got, ab = step_grad(copy.deepcopy(net), batch, 4, compute_loss=compute_loss)
    assert ab.plan.gradient == "precise: the full batch's exact gradient"
    assert relative_error(got, expected) < 1e-12


def assert_trains_as_two_pass(module, compute_loss, reason, caplog):
    """Precise refuses ``module`` (the warning names ``reason``, once) and the step is two_pass's, bit for bit."""
    torch.manual_seed(0)
    net = module.double()
    batch = data(16, (3, 7, 7))
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        got, _ = step_grad(copy.deepcopy(net), batch, 4, compute_loss=compute_loss)
    said = [r.getMessage() for r in caplog.records if "precise=True" in r.getMessage()]
    assert len(said) == 1 and reason in said[0]
    plain, _ = step_grad(copy.deepcopy(net), batch, 4, compute_loss=compute_loss,
                         bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format))
    assert torch.equal(got, plain)


class SkipNet(nn.Module):
    """Four segments in two groups of two (as tests/batchnorm/test_segment_layout.py's SkipNet)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (nn.Conv2d(3, 3, 1) for _ in range(3))
        self.bn1, self.bn2, self.bn3 = (nn.BatchNorm2d(3) for _ in range(3))
        self.head = nn.Linear(3, 5)

    def forward(self, x):
        b = self.bn1(self.conv1(x))
        d = self.bn2(self.conv2(b.relu())) + b
        return self.head(self.bn3(self.conv3(d)).mean((2, 3)))


@pytest.mark.parametrize("whole", [True, False], ids=["whole segments", "every boundary"])
def test_every_boundary_kept_where_memory_allows_recomputes_no_forward_and_stays_exact(whole, monkeypatch):
    """#38.4: the first step (measured) keeps what crosses groups and recomputes each group's inner boundary; where
    the step's peak and what keeping every boundary adds fit the budget, later steps keep every boundary and run
    each segment once per micro-batch in the backward, or, where recomputing whole segments fits too, once for the
    whole batch. The refill stops at a group's last inner boundary: the group's last segment (conv2's, conv3's...
    here conv2) is not run in it."""
    if not whole:  # as if a whole segment's tensors did not fit
        monkeypatch.setattr("autobatch.batchnorm.segment_run.SegmentRun.whole_segment_bytes", 1 << 60)
    torch.manual_seed(0)
    net = SkipNet().double()
    batch = data(8, (3, 4, 4))
    expected = full_grad(copy.deepcopy(net), batch)
    model, counted = copy.deepcopy(net), collections.Counter()
    for name in ("conv1", "conv2", "conv3"):
        getattr(model, name).register_forward_hook(lambda module, args, out, name=name: counted.update([name]))
    ab, grads = recording(model, 8, micro_batch=4)
    calls = []
    for _ in range(2):
        counted.clear()
        ab.step(*batch)
        calls.append(dict(counted))
    # Phase 1 once, each micro-batch's segment once (whole segments: once); grouped, conv1 (group 1's inner
    # boundary) twice more.
    again = 2 if whole else 3
    assert calls == [{"conv1": 5, "conv2": 3, "conv3": 5}, {"conv1": again, "conv2": again, "conv3": again}]
    assert ab.plan.boundaries is (Boundaries.WHOLE_SEGMENTS if whole else Boundaries.EVERY)
    assert ab.plan.boundary_bytes > 0
    assert "precise keeps" in str(ab.plan)
    for got in grads:
        assert relative_error(got, expected) < 1e-10


def test_a_fixed_micro_batch_keeps_the_grouped_boundaries_where_the_memory_leaves_no_room(monkeypatch):
    from autobatch.planning.memory import DeviceMemory
    tight = DeviceMemory("cpu", "host", 1 << 20, 1 << 16, 0, "psutil")
    monkeypatch.setattr("autobatch.planning.planner.probe", lambda device, resident_bytes=0: tight)
    torch.manual_seed(0)
    net = ResidualNet(blocks=2, channels=6, head_norm=True).double()
    batch = data(16, (3, 6, 6))
    expected = full_grad(copy.deepcopy(net), batch)
    ab, grads = recording(copy.deepcopy(net), 16, micro_batch=4)
    for _ in range(2):
        ab.step(*batch)
    assert ab.plan.boundaries is Boundaries.GROUPED and ab.plan.boundary_bytes == 0
    assert all(relative_error(got, expected) < 1e-10 for got in grads)


class WideNarrow(nn.Module):
    """Residual blocks whose BatchNorm normalizes a narrow tensor made from a wide one: keeping every boundary
    costs little beside the step's activations."""

    def __init__(self, blocks=3, narrow=4, wide=48):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, narrow, 1), nn.BatchNorm2d(narrow))
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(narrow, wide, 1), nn.ReLU(), nn.Conv2d(wide, narrow, 1),
                                                  nn.BatchNorm2d(narrow)) for _ in range(blocks))
        self.head = nn.Linear(narrow, 5)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean((2, 3)))


def test_the_planner_keeps_every_boundary_only_within_the_budget_and_counts_it_in_the_peak():
    """Measured: at 6 MiB the largest micro-batch leaves no room for what keeping every boundary adds, at 8 MiB it
    does (and the whole batch still does not fit)."""
    torch.manual_seed(0)
    net = WideNarrow().double()
    batch = data(32, (3, 12, 12))
    expected = full_grad(copy.deepcopy(net), batch)
    plans = {}
    for budget in ("6MiB", "8MiB"):
        ab, grads = recording(copy.deepcopy(net), 32, memory_budget=budget, micro_batch="auto")
        for _ in range(3):
            ab.step(*batch)
        plan = plans[budget] = ab.plan
        state = ab._planner.state
        assert len(plan.splits) > 1 and plan.predicted_peak_bytes <= plan.budget_bytes
        extra = int(state.every_boundary_per_element * plan.sample_size)
        assert extra > 0
        if plan.boundaries is Boundaries.EVERY:
            assert plan.boundary_bytes == extra
            assert plan.predicted_peak_bytes - extra >= state.model.predict(plan.micro_batch, plan.sample_size)
        assert all(relative_error(got, expected) < 1e-10 for got in grads)
    assert plans["6MiB"].boundaries is Boundaries.GROUPED and plans["8MiB"].boundaries is Boundaries.EVERY


def test_boundaries_kept_in_host_memory_give_the_same_exact_steps(monkeypatch):
    """#38.6, tested on the host for equality (no GPU here): with Boundaries.HOST phase 1 moves every kept tensor
    to host memory once it is done with it (pinned where it comes from CUDA) and the backward brings rows back;
    three momentum steps equal the unsplit ones, and no batched boundary stays where the graph runs."""
    from autobatch.batchnorm.segment_run import SegmentRun
    moved = []
    backward = SegmentRun.backward

    def watched(self, *args, **kwargs):
        originals = {node for node in self._kept if node not in self._on_host and node.op != "placeholder"}
        moved.append((len(self._on_host), sorted(node.name for node in originals)))
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(SegmentRun, "backward", watched)

    def to_host(ab):  # the first step chose its boundaries; host memory is the planner's last resort on CUDA
        ab._planner.state.plan = ab.plan.replace(boundaries=Boundaries.HOST, boundary_bytes=0)

    torch.manual_seed(0)
    _, _, ab = three_momentum_steps(SharedOutput().double(), 12, (3, 5, 5), to_host)
    assert moved[0][0] == 0 and all(count > 0 for count, _ in moved[1:])
    assert all(kept == ["head"] for _, kept in moved[1:])  # only the output (small, per sample) stays
    assert "in host memory" in str(ab.plan)
