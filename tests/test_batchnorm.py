import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobatch.batchnorm.full_batch import FullBatchStatistics, _ProjectedBatchNorm
from autobatch.batchnorm.intercept import intercept_batch_norm
from autobatch.batchnorm.micro import PooledBatchNorm, _Pool
from autobatch.batchnorm.statistics import BatchNormState, batch_norm_modules, uses_batch_statistics


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
    two_pass.finish_statistics_pass(complete=True)
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


def merged(x, sizes):
    pool = None
    for chunk in torch.split(x, sizes):
        mean, var = chunk.mean(0), chunk.var(0, unbiased=False)
        if pool is None:
            pool = _Pool("test", 1e-5, None, None, 0.1, len(chunk), mean, var * len(chunk))
        else:
            pool.merge(len(chunk), mean, var)
    return pool.mean, pool.m2 / (pool.count - 1)


def test_pool_merge_is_exact():
    x = torch.randn(23, 3, dtype=torch.float64) * 3 + 2
    mean, var = merged(x, [9, 7, 7])
    torch.testing.assert_close(mean, x.mean(0), rtol=1e-13, atol=0)
    torch.testing.assert_close(var, x.var(0), rtol=1e-13, atol=0)


def test_pool_merge_is_stable_where_sum_of_squares_is_not():
    torch.manual_seed(0)
    x32 = 1e3 + torch.randn(4096, 3)
    reference = x32.double().var(0)
    _, var = merged(x32, [1024] * 4)
    naive = (x32 ** 2).mean(0) - x32.mean(0) ** 2
    assert ((var.double() - reference) / reference).abs().max() < 1e-4
    assert ((naive.double() - reference) / reference).abs().max() > 1e-2  # what the merge avoids


@pytest.mark.parametrize("momentum", [0.1, None])
def test_pooled_commits_full_batch_running_statistics_once(momentum):
    torch.manual_seed(0)
    x = torch.randn(10, 3, 4, dtype=torch.float64)
    full = nn.BatchNorm1d(3, momentum=momentum).double()
    full.num_batches_tracked.fill_(2)
    micro = nn.BatchNorm1d(3, momentum=momentum).double()
    micro.load_state_dict(full.state_dict())
    full(x)
    state = BatchNormState([micro])
    pooled = PooledBatchNorm({})
    with intercept_batch_norm(pooled.handle):
        for index, part in enumerate(torch.split(x, [4, 3, 3])):
            pooled.start_micro_batch()
            micro(part)
            if index == 0:
                state.mark_counted()
    state.keep_counted()
    pooled.commit()
    for name, value in full.state_dict().items():
        torch.testing.assert_close(micro.state_dict()[name], value, rtol=1e-12, atol=1e-14)


def test_state_restores_every_buffer():
    bn = nn.BatchNorm2d(3)
    state = BatchNormState(batch_norm_modules(nn.Sequential(bn)))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    bn(torch.randn(4, 3, 2, 2))
    state.restore()
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_uses_batch_statistics():
    frozen = nn.BatchNorm2d(3).eval()
    untracked = nn.BatchNorm2d(3, track_running_stats=False).eval()
    assert not uses_batch_statistics([frozen])
    assert uses_batch_statistics([frozen, untracked])
    assert uses_batch_statistics([nn.BatchNorm2d(3)])
