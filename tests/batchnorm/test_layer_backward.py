"""One BatchNorm's backward over the whole batch from its micro-batches (autobatch.batchnorm.layer_backward),
against F.batch_norm's own backward of the whole batch, in float64."""
import torch
import torch.nn.functional as F

from autobatch.batchnorm.layer_backward import LayerBackward
from autobatch.batchnorm.statistics import LayerStatistics


def statistics(x, eps):
    var = x.var((0, 2, 3), unbiased=False)
    count = x.numel() // x.shape[1]
    return LayerStatistics("bn", x.mean((0, 2, 3)), (var + eps).rsqrt(), var, eps, count)


def test_the_worked_example_of_the_note():
    x = torch.tensor([0.0, 2.0, 4.0, 6.0], dtype=torch.float64).view(4, 1, 1, 1)
    backward = LayerBackward(x, statistics(x, 1e-300), None)
    backward.add(0, 2, torch.tensor([1.0, 0.0], dtype=torch.float64).view(2, 1, 1, 1))
    backward.add(2, 4, torch.zeros(2, 1, 1, 1, dtype=torch.float64))
    got = torch.cat([backward.input_grad(0, 2), backward.input_grad(2, 4)]).view(-1) * 5 ** 0.5
    assert torch.allclose(got, torch.tensor([0.3, -0.4, -0.1, 0.2], dtype=torch.float64), atol=1e-14)


def test_micro_batches_give_the_whole_batch_s_gradients():
    torch.manual_seed(0)
    x = torch.randn(10, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(10, 3, 4, 4, dtype=torch.float64)
    F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5).backward(g)
    backward = LayerBackward(x.detach(), statistics(x.detach(), 1e-5), weight)
    for start, stop in ((0, 4), (4, 7), (7, 10)):
        backward.add(start, stop, g[start:stop])
    got = torch.cat([backward.input_grad(start, stop) for start, stop in ((0, 5), (5, 10))])
    weight_grad, bias_grad = backward.parameter_grads()
    assert (got - x.grad).abs().max() < 1e-12 * x.grad.abs().max()
    assert torch.allclose(weight_grad, weight.grad, rtol=1e-12) and torch.allclose(bias_grad, bias.grad, rtol=1e-12)


def test_samples_of_several_rows_each_give_the_whole_batch_s_gradients():
    """Ranges count samples: with 2 rows per sample (tokens flattened into the first dimension), samples 1:4 are
    rows 2:8, read across the parts the micro-batches added."""
    torch.manual_seed(0)
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(10, 3, dtype=torch.float64)
    F.batch_norm(x, None, None, weight, None, training=True, eps=1e-5).backward(g)
    var = x.detach().var(0, unbiased=False)
    layer = LayerStatistics("bn", x.detach().mean(0), (var + 1e-5).rsqrt(), var, 1e-5, 10)
    backward = LayerBackward(x.detach(), layer, weight, per_sample=2)
    backward.add(0, 2, g[0:4])
    backward.add(2, 5, g[4:10])
    got = torch.cat([backward.input_grad(0, 1), backward.input_grad(1, 4), backward.input_grad(4, 5)])
    assert got.shape == x.shape and (got - x.grad).abs().max() < 1e-12 * x.grad.abs().max()
    assert torch.allclose(backward.parameter_grads()[0], weight.grad, rtol=1e-12)
