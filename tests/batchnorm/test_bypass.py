import warnings

import pytest
import torch
from torch import nn

import autobatch
from tests.common import assert_same_state, model_state

ce = nn.CrossEntropyLoss()


class OwnKernelBatchNorm(nn.BatchNorm2d):
    """A BatchNorm whose forward calls torch.batch_norm itself, never F.batch_norm."""

    def forward(self, x):
        return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, self.training,
                                0.1, self.eps, False)


def scripted(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated, and still used
        return torch.jit.script(module)


def net(norm: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), norm, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 2))


def models():
    yield "own kernel", net(OwnKernelBatchNorm(4))
    yield "TorchScript submodule", net(scripted(nn.BatchNorm2d(4)))
    yield "TorchScript model", scripted(net(nn.BatchNorm2d(4)))


@pytest.mark.parametrize("bn", ["two_pass", "micro"])
@pytest.mark.parametrize("name, model", list(models()), ids=[m[0] for m in models()])
def test_a_batch_norm_autobatch_cannot_see_is_refused_and_the_step_undone(name, model, bn):
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,))
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 8, ce, micro_batch=4,
                        bn=bn)
    before = model_state(model)
    with pytest.raises(RuntimeError, match="layer '1' changed running statistics without calling "
                                           "torch.nn.functional.batch_norm"):
        ab.step(x, y)
    assert_same_state(before, model_state(model))


def test_a_single_split_is_a_plain_step_and_needs_no_check():
    model = net(scripted(nn.BatchNorm2d(4)))
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, ce, micro_batch=8)
    ab.step(torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,)))
    assert model[1].num_batches_tracked.item() == 1


class UnusedAndFrozen(nn.Module):
    """A BatchNorm never called, and one in eval mode: their running statistics rightly stay. An
    InstanceNorm normalizes each sample alone, so its outputs do not depend on the split."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.frozen = nn.BatchNorm2d(4).eval()
        self.unused = nn.BatchNorm2d(4)
        self.instance = nn.InstanceNorm2d(4, track_running_stats=True)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.instance(self.frozen(self.conv(x)))).mean((2, 3)))


@pytest.mark.parametrize("bn", ["two_pass", "micro"])
def test_layers_that_keep_their_statistics_are_not_refused(bn):
    torch.manual_seed(0)
    model = UnusedAndFrozen()
    model.frozen.running_mean.fill_(0.5)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, ce, micro_batch=4, bn=bn)
    ab.step(torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,)))
    assert model.bn.num_batches_tracked.item() == 1
    assert model.unused.num_batches_tracked.item() == 0 and (model.frozen.running_mean == 0.5).all()
