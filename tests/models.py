"""Small models for the tests: a residual BatchNorm CNN, its variants, and a model without BatchNorm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BatchNormAct2d", "Block", "Flat", "ResidualNet", "StochasticNet", "TinyLanguageModel", "compiled", "mlp",
           "padded_sequences", "token_loss_mean", "token_loss_sum", "variants"]


class BatchNormAct2d(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: overrides forward and calls F.batch_norm itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, factor, self.eps)
        return F.relu(x)


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


def mlp(features: int = 6, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, classes))


class Flat(nn.Module):
    """A model around one normalization layer, for inputs of any shape."""

    def __init__(self, norm, channels=4):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels))
        self.norm = norm

    def forward(self, x):
        z = x * self.scale.view((1, -1) + (1,) * (x.dim() - 2))
        return self.norm(z) + 0.5 * z  # the skip keeps the gradient off BatchNorm's invariant directions


def variants():
    yield "BatchNorm1d-2d-input", nn.BatchNorm1d(4), (16, 4)
    yield "BatchNorm1d-3d-input", nn.BatchNorm1d(4), (16, 4, 5)
    yield "BatchNorm2d", nn.BatchNorm2d(4), (16, 4, 3, 3)
    yield "BatchNorm3d", nn.BatchNorm3d(4), (16, 4, 2, 2, 2)
    yield "SyncBatchNorm", nn.SyncBatchNorm(4), (16, 4, 3, 3)
    yield "BatchNormAct2d", BatchNormAct2d(4), (16, 4, 3, 3)
    yield "momentum-None", nn.BatchNorm2d(4, momentum=None), (16, 4, 3, 3)
    yield "affine-False", nn.BatchNorm2d(4, affine=False), (16, 4, 3, 3)
    yield "untracked", nn.BatchNorm2d(4, track_running_stats=False), (16, 4, 3, 3)
    yield "eval-mode", nn.BatchNorm2d(4).eval(), (16, 4, 3, 3)
    yield "untracked-eval-mode", nn.BatchNorm2d(4, track_running_stats=False).eval(), (16, 4, 3, 3)


def compiled(model: nn.Module, graphs: list, in_place: bool = False) -> nn.Module:
    """``torch.compile(model)`` (``model.compile()`` with ``in_place``) with a backend that runs each
    graph as traced and appends it to ``graphs``."""
    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch.compiler.reset()  # graphs compiled for another model of the same class are not reused
    if in_place:
        model.compile(backend=backend)
        return model
    return torch.compile(model, backend=backend)


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


class TinyLanguageModel(nn.Module):
    """Token embedding, a GRU and a linear head: next-token logits of shape (batch, length, vocabulary)."""

    def __init__(self, vocabulary: int = 11, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


def padded_sequences(lengths, vocabulary: int = 11, seed: int = 0, dtype=torch.float64):
    """A batch of sequences of ``lengths``, right-padded to the longest: ``{"tokens", "labels"}`` with
    the padding's labels -100 (ignored), as a language-model collator gives them."""
    generator = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    tokens = torch.randint(1, vocabulary, (len(lengths), longest), generator=generator)
    labels = torch.full((len(lengths), longest), -100)
    for row, length in enumerate(lengths):
        tokens[row, length:] = 0
        labels[row, :length] = torch.randint(0, vocabulary, (length,), generator=generator)
    return {"tokens": tokens, "labels": labels}


def token_loss_sum(model: nn.Module, batch) -> tuple:
    """The summed next-token loss over the batch's valid tokens, and their number."""
    logits = model(batch["tokens"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
    return loss, (batch["labels"] != -100).sum()


def token_loss_mean(model: nn.Module, batch) -> torch.Tensor:
    """The mean next-token loss over the batch's valid tokens: the full batch's reference."""
    logits = model(batch["tokens"])
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
