"""bn="micro": statistics pooled over micro-batches, committed once."""
import pytest
import torch
from torch import nn

import autobatch

from autobatch.batchnorm.intercept import intercept_batch_norm
from autobatch.batchnorm.micro import PooledBatchNorm, _Pool
from autobatch.transaction import BatchNormState


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
        for part in torch.split(x, [4, 3, 3]):
            pooled.start_micro_batch()
            micro(part)
            state.forwards_done(1)
    state.count_once()
    pooled.commit()
    for name, value in full.state_dict().items():
        torch.testing.assert_close(micro.state_dict()[name], value, rtol=1e-12, atol=1e-14)


def test_one_value_per_channel_in_a_micro_batch_names_the_micro_batch():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double()
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, nn.CrossEntropyLoss(), micro_batch=1,
                        bn="micro", cache=False)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="1 value per channel for the micro-batch;.*larger micro_batch"):
        ab.step(x, y)
