"""Full-batch statistics in micro-batches: the projected BatchNorm and the order of calls."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobatch.batchnorm.full_batch import FullBatchStatistics, _ProjectedBatchNorm
from autobatch.batchnorm.intercept import intercept_batch_norm


def projected_backward_formula(g, x, gamma, mean, var, eps):
    """two_pass's backward written out in Python: the full batch's invstd, ``xhat`` centred within this
    micro-batch, and means over this micro-batch."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    xhat = (x - mean.view(shape)) / (var.view(shape) + eps).sqrt()
    centred = xhat - xhat.mean(dims, keepdim=True)
    return gamma.view(shape) / (var.view(shape) + eps).sqrt() * (
        g - g.mean(dims, keepdim=True) - centred * (g * centred).mean(dims, keepdim=True))


def test_projected_forward_and_backward_match_full_batch_formula():
    torch.manual_seed(0)
    x = torch.randn(12, 4, 5, 5, dtype=torch.float64)
    gamma = torch.randn(4, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    eps = 1e-5
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    invstd = (var + eps).rsqrt()
    full = F.batch_norm(x, None, None, gamma, beta, True, 0.0, eps)
    part = x[:5].clone().requires_grad_()
    out = _ProjectedBatchNorm.apply(part, gamma, beta, mean, invstd, var, eps, part.detach().mean((0, 2, 3)))
    torch.testing.assert_close(out, full[:5], rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(part.grad, projected_backward_formula(g, part.detach(), gamma.detach(), mean,
                                                                     var, eps), rtol=1e-10, atol=1e-12)
    xhat = (part.detach() - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    torch.testing.assert_close(gamma.grad, (g * xhat).sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(beta.grad, g.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)


def test_two_pass_rejects_a_different_sequence_of_calls():
    two_pass = FullBatchStatistics({})
    bn3, bn4 = nn.BatchNorm1d(3), nn.BatchNorm1d(4)
    with torch.no_grad(), intercept_batch_norm(two_pass.record):
        bn3(torch.randn(8, 3))
    two_pass.finish_phase1(complete=True)
    with intercept_batch_norm(two_pass.apply):
        two_pass.start_micro_batch()
        with pytest.raises(RuntimeError, match="channels.*bn='micro'"):
            bn4(torch.randn(4, 4))
        two_pass.start_micro_batch()
        bn3(torch.randn(4, 3))
        with pytest.raises(RuntimeError, match="more training-mode BatchNorm calls"):
            bn3(torch.randn(4, 3))
        two_pass.start_micro_batch()
        with pytest.raises(RuntimeError, match="made 0 training-mode BatchNorm calls"):
            two_pass.finish_micro_batch()
