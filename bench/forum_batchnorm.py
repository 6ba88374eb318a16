"""The forum user's CustomBatchNorm2d and training step, as posted (indentation restored).

Reproduced for the cost benchmark only: it is the scheme autobatch replaces, not a training mode.
"""
import copy

import torch
import torch.nn as nn

__all__ = ["CustomBatchNorm2d", "forum_model", "forum_step"]


class CustomBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super(CustomBatchNorm2d, self).__init__(num_features, eps, momentum, affine, track_running_stats)
        self.set_phase(phase=1)
        self.register_buffer('batch_mean', torch.zeros(num_features))
        self.register_buffer('batch_var', torch.ones(num_features))

    def set_phase(self, phase=1):
        self.phase = phase

    def end_cycle(self):  # reset the current batch mean and variance
        self.batch_mean.zero_()
        self.batch_var.fill_(1)
        self.set_phase(phase=1)

    def forward(self, input):
        self._check_input_dim(input)
        exponential_average_factor = 0.0
        if self.training and self.track_running_stats:
            if self.phase == 1:  # only update the running mean and var in phase one
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked += 1
                    if self.momentum is None:  # use cumulative moving average
                        exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                    else:  # use exponential moving average
                        exponential_average_factor = self.momentum
        # calculate running estimates
        if self.training:
            mean = input.mean([0, 2, 3])
            # use biased var in train
            var = input.var([0, 2, 3], unbiased=False)
            n = input.numel() / input.size(1)
            if self.phase == 1:  # phase one, update the running mean and var, as well as save the curr mean and var
                with torch.no_grad():
                    self.running_mean = exponential_average_factor * mean \
                        + (1 - exponential_average_factor) * self.running_mean
                    # update running_var with unbiased var
                    self.running_var = exponential_average_factor * var * n / (n - 1) \
                        + (1 - exponential_average_factor) * self.running_var
                    self.batch_mean.copy_(mean)
                    self.batch_var.copy_(var)
            elif self.phase == 2:  # phase two, use the saved mean and variance for the whole batch
                mean = self.batch_mean
                var = self.batch_var
        else:  # eval, use the running mean and variance
            mean = self.running_mean
            var = self.running_var
        input = (input - mean[None, :, None, None]) / (torch.sqrt(var[None, :, None, None] + self.eps))
        if self.affine:
            input = input * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return input


def forum_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm2d replaced by CustomBatchNorm2d (same values)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d:
                custom = CustomBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                           child.track_running_stats)
                custom.load_state_dict(child.state_dict(), strict=False)
                setattr(module, child_name, custom)
    return model


def forum_step(model, optimizer, imgs, targets, loss_fn, splits):
    """The forum's training loop for one batch (single iteration)."""
    model.train()
    model.zero_grad()
    for layer in model.modules():
        if isinstance(layer, CustomBatchNorm2d):
            layer.set_phase(phase=1)
    with torch.no_grad():
        _ = model(imgs)
    model.zero_grad()
    model.train()
    for layer in model.modules():
        if isinstance(layer, CustomBatchNorm2d):
            layer.set_phase(phase=2)
    split_batch = int(imgs.size()[0] / splits)
    for split in range(splits):
        imgs_split = imgs[split * split_batch:(split + 1) * split_batch, :, :, :]
        loss = loss_fn(model(imgs_split), targets[split * split_batch:(split + 1) * split_batch])
        loss /= splits
        loss.backward()  # accumulate gradients
    optimizer.step()
    for layer in model.modules():
        if isinstance(layer, CustomBatchNorm2d):
            layer.end_cycle()
