"""randomness.py: two_pass's micro-batches see phase 1's dropout and stochastic-depth masks (float64).

The reference is the full batch with the same masks: the generator seeded alike before the full
batch's forward and before the step, whose phase 1 draws them in the same order."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import autobatch
from autobatch.batchnorm.randomness import RandomDraws
from autobatch.reference import flat_grad, relative_error
from tests import common
from tests.common import StochasticNet, compiled
from tests.test_step import bn_outputs

ce = nn.CrossEntropyLoss()


def data(n=16, size=6, seed=0):
    return common.data(n, (3, size, size), seed=seed)


class Checkpointed(nn.Module):
    """StochasticNet with every block under activation checkpointing."""

    def __init__(self, net, reentrant=False):
        super().__init__()
        self.net, self.reentrant = net, reentrant

    def forward(self, x):
        net = self.net
        x = F.silu(net.bn(net.stem(x)))
        for block in net.blocks:
            x = checkpoint(block, x, use_reentrant=self.reentrant)
        x = F.dropout(net.fc1(x.mean((2, 3))), 0.3, self.training)
        return net.fc2(F.silu(net.head_bn(x)))


def autobatch_step(model, x, y, micro_batch=5, seed=1, **options):
    """One two_pass step with the generator seeded at ``seed``; its loss and accumulated gradient."""
    grads = []
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0), len(x), ce, micro_batch=micro_batch,
                        bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format),
                        before_step=lambda ab: grads.append(flat_grad(ab.model)), **options)
    torch.manual_seed(seed)
    return ab.step(x, y), grads[0], ab


@pytest.mark.parametrize("variant", ["plain", "checkpointed", "checkpointed-reentrant",
                                     pytest.param("compiled", marks=pytest.mark.slow)])
def test_micro_batches_see_the_full_batch_forward_with_the_same_masks(variant):
    """Loss and every BatchNorm output of two_pass equal the full batch's with the same masks."""
    torch.manual_seed(0)
    net = StochasticNet(blocks=3).double()
    x, y = data()
    full = copy.deepcopy(net)
    full_outputs = bn_outputs(full)
    torch.manual_seed(1)
    full_loss = ce(full(x), y).item()
    model = copy.deepcopy(net)
    outputs = bn_outputs(model)
    if variant.startswith("checkpointed"):
        model = Checkpointed(model, reentrant=variant.endswith("reentrant"))
    elif variant == "compiled":
        model = compiled(model, [])
    loss, grad, _ = autobatch_step(model, x, y)
    assert loss == pytest.approx(full_loss, rel=1e-10)
    assert len(full_outputs) == 3 * 3 + 2
    for name, (whole,) in full_outputs.items():
        # Checkpointing calls the blocks' layers again in each micro-batch's backward, after its forward;
        # reentrant checkpointing runs the forward without grad, so only the recomputations are collected.
        repeated = variant == "checkpointed" and name.startswith("blocks")
        parts = outputs[name][0::2] if repeated else outputs[name]
        assert relative_error(torch.cat(parts), whole) < 1e-10, name
    if variant == "compiled":
        # Replay and the check are traced into the graphs (the hooks above are not: they grow lists):
        # the next step, with new masks, compiles nothing more.
        graphs = []
        _, _, ab = autobatch_step(compiled(copy.deepcopy(net), graphs), x, y)
        compiled_in_first_step = len(graphs)
        ab.step(x, y)
        assert len(graphs) == compiled_in_first_step
    if variant.startswith("checkpointed"):
        # The recomputation in backward got the forward's masks: the gradient of the model without it.
        _, reference, _ = autobatch_step(copy.deepcopy(net), x, y)
        assert relative_error(grad, reference) < 1e-10


@pytest.mark.parametrize("chunks", [1, 3])
def test_micro_batches_normalize_what_phase_one_measured(chunks):
    """A chunked phase 1 draws in another order than the full batch, so the check is the property
    itself: what the micro-batches feed each BatchNorm has the statistics they use."""
    torch.manual_seed(0)
    # A chunked phase 1 pools per-chunk statistics, exact for the first BatchNorm only: one block's
    # first layer after a dropout keeps the check exact there.
    net = StochasticNet(blocks=3).double() if chunks == 1 else nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Dropout2d(0.3), nn.Dropout(0.2), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5)).double()
    x, y = data()
    net(x)
    inputs = bn_outputs(net, inputs=True)
    ab = autobatch.wrap(net, torch.optim.SGD(net.parameters(), lr=0.0), 16, ce, micro_batch=5,
                        bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format))
    ab.plan = ab.plan.replace(phase1_chunks=chunks)
    torch.manual_seed(1)
    ab.step(x, y)
    layers = {layer.name: layer for layer in ab._strategy.handler.layers}
    assert set(layers) == set(inputs) and len(layers) >= 1
    for name, parts in inputs.items():
        whole = torch.cat(parts)
        dims = [0] + list(range(2, whole.dim()))
        torch.testing.assert_close(whole.mean(dims), layers[name].mean, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(whole.var(dims, unbiased=False), layers[name].var, rtol=1e-10, atol=1e-12,
                                   msg=name)


def test_deep_stochastic_depth_model_trains_like_the_full_batch():
    """Drawn afresh in each micro-batch, this model's masks put its first gradient at 3.8e8 times
    ... the full batch's 1.46 (measured before replay); with replay it stays at the full batch's scale."""
    torch.manual_seed(1)
    net = StochasticNet(blocks=8).double()
    x, y = data(size=12, seed=1)
    full = copy.deepcopy(net)
    torch.manual_seed(1)
    ce(full(x), y).backward()
    full_norm = flat_grad(full).norm().item()
    _, grad, _ = autobatch_step(copy.deepcopy(net), x, y, micro_batch=2)
    assert 0.5 < grad.norm().item() / full_norm < 2, (grad.norm().item(), full_norm)
    model = copy.deepcopy(net)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), 16, ce, micro_batch=2)
    for step in range(10):
        x, y = data(size=12, seed=10 + step)
        loss = ab.step(x, y)
        assert loss == loss and loss < 10, (step, loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_draws_after_the_last_batch_norm_are_drawn_afresh():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    ab = autobatch.wrap(net, torch.optim.SGD(net.parameters(), lr=0.1), 16, ce, micro_batch=4, bn="two_pass")
    for _ in range(3):
        ab.step(x, y)
    assert ab._strategy.draws.recorded == 0  # phase 1 stops at the BatchNorm, before the dropout


def test_a_draw_that_is_neither_per_sample_nor_whole_is_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            noise = torch.rand(len(x) + 1, 4, dtype=x.dtype)[:len(x)]
            return self.bn(self.fc(x) + noise)

    net = Odd().double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    ab = autobatch.wrap(net, torch.optim.SGD(net.parameters(), lr=0.1), 16, ce, micro_batch=4)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(RuntimeError, match=r"random draw #0 \(rand\) has shape \(5, 4\).*\(17, 4\)"):
        ab.step(x, y)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_dropout_records_the_mask_pytorch_draws():
    x = torch.randn(16, 8, 5, 5, dtype=torch.float64)
    for dropout in (F.dropout, F.dropout2d):
        torch.manual_seed(3)
        expected = dropout(x, 0.3, True)
        draws = RandomDraws()
        torch.manual_seed(3)
        with draws.record(0, 16):
            got = dropout(x, 0.3, True)
        assert torch.equal(got, expected) and draws.recorded == 1
        with draws.replay(4, 8):
            part = dropout(x[4:12], 0.3, True)
        assert torch.equal(part, expected[4:12])


def test_nothing_is_left_intercepted():
    torch.manual_seed(0)
    net = StochasticNet(blocks=1).double()
    autobatch_step(net, *data())
    assert torch._C._len_torch_function_stack() == 0


def test_a_random_op_that_is_not_replayed_stops_the_step():
    """alpha_dropout is not replayed: the micro-batches feed the BatchNorm other inputs than phase 1
    measured, and the step is refused before the optimizer step, naming the layer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.AlphaDropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    before = copy.deepcopy(net.state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    ab = autobatch.wrap(net, opt, 16, ce, micro_batch=4, bn="two_pass")
    with pytest.raises(RuntimeError, match=r"BatchNorm layer '2' got inputs in a micro-batch whose mean lies .* "
                                           r"standard deviations from phase 1's"):
        ab.step(x, y)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not opt.state


def test_a_channel_with_a_large_mean_and_a_tiny_spread_is_not_refused():
    """The float32 rounding of a mean of 1e4 (summed per sample, then over samples, in phase 1; over
    everything at once in a micro-batch) is far more than 0.02 of a spread of 1e-3: allowed."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.randn(16, 3, 12, 12), torch.randint(0, 3, (16,))
    net(x)
    with torch.no_grad():
        net[0].weight.mul_(1e-3)
        net[0].bias.fill_(1e4)
    ab = autobatch.wrap(net, torch.optim.SGD(net.parameters(), lr=0.0), 16, ce, micro_batch=5,
                        bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format))
    assert math.isfinite(ab.step(x, y)) and ab.plan.splits == [4, 4, 4, 4]


class AttentionThenBatchNorm(nn.Module):
    """A Transformer encoder layer (attention dropout 0.5) and a BatchNorm over its features."""

    def __init__(self, need_weights=False):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.5, batch_first=True)
        self.attention = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True)
        self.need_weights = need_weights
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.layer(self.embed(x))
        h = h + self.attention(h, h, h, need_weights=self.need_weights)[0]
        return self.head(self.norm(h.transpose(1, 2)).mean(2))


@pytest.mark.parametrize("need_weights", [False, True])
def test_attention_dropout_is_replayed_in_every_micro_batch(need_weights):
    """Without the replay the masks differ (0.5 apart at p=0.5) and the check refuses the step."""
    torch.manual_seed(0)
    net = AttentionThenBatchNorm(need_weights).double()
    x, y = torch.randn(16, 5, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    ab = autobatch.wrap(net, torch.optim.SGD(net.parameters(), lr=0.1), 16, ce, micro_batch=4, cache=False,
                        bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format))
    for _ in range(2):
        assert math.isfinite(ab.step(x, y))


@pytest.mark.parametrize("case", ["plain", "causal", "bool mask", "float mask", "scale", "grouped heads"])
def test_explicit_attention_is_the_fused_one_without_dropout(case):
    from autobatch.batchnorm.randomness import _explicit_attention

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64, generator=generator)
    k, v = (torch.randn(2, 2 if case == "grouped heads" else 4, 6, 8, dtype=torch.float64, generator=generator)
            for _ in range(2))
    options = {"causal": {"is_causal": True}, "bool mask": {"attn_mask": torch.rand(5, 6, generator=generator) > 0.3},
               "float mask": {"attn_mask": torch.randn(5, 6, dtype=torch.float64, generator=generator)},
               "scale": {"scale": 0.3}, "grouped heads": {"enable_gqa": True}}.get(case, {})
    if case == "causal":
        k, v = k[..., :5, :], v[..., :5, :]
    expected = F.scaled_dot_product_attention(q, k, v, **options)
    got = _explicit_attention(lambda func, args, kwargs: func(*args, **{**kwargs, "training": False}), q, k, v,
                              dropout_p=0.5, **options)
    assert torch.allclose(got, expected, atol=1e-12)


class ZeroDropoutBetweenDraws(nn.Module):
    """nn.Dropout(0.0) between stochastic-depth draws, as torchvision's MaxViT has them (its attention and MLP
    dropouts default to 0): a call of a dropout that draws nothing."""

    def __init__(self, channels=4):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(2))
        self.bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(2))
        self.drop, self.head = nn.Dropout(0.0), nn.Linear(channels, 5)

    def forward(self, x):
        x = self.bn(self.stem(x)).relu()
        for conv, bn in zip(self.convs, self.bns):
            keep = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(0.7) / 0.7  # timm's drop path
            x = x + self.drop(bn(conv(x)).relu()) * keep
        return self.head(x.mean((2, 3)))


def test_a_dropout_that_draws_nothing_takes_no_draw_of_phase_ones():
    """Replay counted the micro-batch's Dropout(0.0) calls as draws, which phase 1 never recorded: every draw after
    one got the next draw's mask. On torchvision's maxvit_t two_pass ended the step (a BatchNorm input 0.117 standard
    deviations from phase 1's) and so did the default (precise's recomputation 0.898 away)."""
    torch.manual_seed(0)
    net = ZeroDropoutBetweenDraws().double()
    x, y = data()
    full = copy.deepcopy(net)
    torch.manual_seed(1)
    full_loss = ce(full(x), y)
    full_loss.backward()
    loss, _, _ = autobatch_step(copy.deepcopy(net), x, y, micro_batch=4)
    assert loss == pytest.approx(full_loss.item(), rel=1e-10)
    model = copy.deepcopy(net)
    grads = []
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0), len(x), ce, micro_batch=4,
                        before_step=lambda ab: grads.append(flat_grad(ab.model)))
    torch.manual_seed(1)
    ab.step(x, y)
    assert relative_error(grads[0], flat_grad(full)) < 1e-12 and ab.plan.gradient.startswith("precise")
