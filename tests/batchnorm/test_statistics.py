"""BatchNorm layers, their buffers' snapshot, and whether they use batch statistics."""
import torch
from torch import nn

from autobatch.batchnorm.statistics import batch_norm_modules, uses_batch_statistics
from autobatch.transaction import BatchNormState


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
