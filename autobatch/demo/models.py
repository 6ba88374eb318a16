"""Small BatchNorm models to try autobatch on, shared by the tests and the benchmarks: a residual CNN,
one with stochastic depth and dropout whose every random draw comes before its last BatchNorm, a
two-convolution net for images of any size, and an attention encoder over token sequences.

    >>> model = ResidualNet(blocks=4, channels=8, classes=5)      # (N, 3, H, W) -> (N, 5)
    >>> model = StochasticNet()                                   # the same, with random layers
    >>> model = AttentionEncoder()                                # (N, L) tokens -> (N, L, vocabulary)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionEncoder", "Block", "ResidualNet", "StochasticBlock", "StochasticNet", "two_conv_net"]


class Block(nn.Module):
    def __init__(self, channels: int, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResidualNet(nn.Module):
    """Stem conv + BN, ``blocks`` residual blocks of two conv + BN, pooled linear head."""

    def __init__(self, blocks: int = 4, channels: int = 8, classes: int = 5, norm=nn.BatchNorm2d,
                 head_norm: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = norm(channels)
        self.blocks = nn.Sequential(*(Block(channels, norm) for _ in range(blocks)))
        self.head_bn = nn.BatchNorm1d(channels) if head_norm else nn.Identity()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(self.head_bn(x.mean((2, 3))))


class StochasticBlock(nn.Module):
    """An inverted-residual block whose branch is dropped per sample (stochastic depth, "row" mode, as
    torchvision's StochasticDepth draws it), with a channel dropout inside the branch."""

    def __init__(self, channels: int, survival: float = 0.7):
        super().__init__()
        self.expand = nn.Conv2d(channels, 2 * channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * channels)
        self.depthwise = nn.Conv2d(2 * channels, 2 * channels, 5, padding=2, groups=2 * channels, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * channels)
        self.project = nn.Conv2d(2 * channels, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.survival = survival

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = F.silu(self.bn1(self.expand(x)))
        branch = F.dropout2d(F.silu(self.bn2(self.depthwise(branch))), 0.2, self.training)
        branch = self.bn3(self.project(branch))
        if self.training:
            keep = torch.empty([x.shape[0], 1, 1, 1], dtype=x.dtype, device=x.device).bernoulli_(self.survival)
            branch = branch * keep.div_(self.survival)
        return x + branch


class StochasticNet(nn.Module):
    """Stochastic-depth blocks and a dropout before a BatchNorm1d head: every random draw comes
    before the last BatchNorm call, so two_pass's forward can equal the full batch's with the same masks."""

    def __init__(self, blocks: int = 4, channels: int = 8, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.blocks = nn.Sequential(*(StochasticBlock(channels) for _ in range(blocks)))
        self.fc1 = nn.Linear(channels, 16)
        self.head_bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.silu(self.bn(self.stem(x))))
        x = F.dropout(self.fc1(x.mean((2, 3))), 0.3, self.training)
        return self.fc2(F.silu(self.head_bn(x)))


def two_conv_net(channels: int = 16, classes: int = 5) -> nn.Module:
    """Two convolutions with BatchNorm and a pooled head: activations proportional to the image's pixels."""
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


class AttentionEncoder(nn.Module):
    """One attention layer over token sequences, in plain matrix products (memory quadratic in the
    length, as attention without fused kernels), a BatchNorm over features, and per-token logits."""

    def __init__(self, vocabulary: int = 50, width: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.norm = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        scores = self.query(x) @ self.key(x).transpose(1, 2) / math.sqrt(x.shape[-1])
        x = x + torch.softmax(scores, -1) @ self.value(x)
        return self.head(self.norm(x.transpose(1, 2)).transpose(1, 2))
