"""A little U-Net with BatchNorm after every convolution.

    >>> UNet(width=16)(torch.randn(2, 3, 48, 48)).shape
    torch.Size([2, 2, 48, 48])
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["UNet"]


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """Three levels (``width``, 2x, 4x channels), skip connections, ``classes`` output maps."""

    def __init__(self, width: int = 16, classes: int = 2):
        super().__init__()
        self.down1 = _double_conv(3, width)
        self.down2 = _double_conv(width, 2 * width)
        self.bottom = _double_conv(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.merge2 = _double_conv(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.merge1 = _double_conv(2 * width, width)
        self.head = nn.Conv2d(width, classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.down1(x)
        d2 = self.down2(self.pool(d1))
        b = self.bottom(self.pool(d2))
        u2 = self.merge2(torch.cat([self.up2(b), d2], 1))
        u1 = self.merge1(torch.cat([self.up1(u2), d1], 1))
        return self.head(u1)
