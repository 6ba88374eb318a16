"""What the tests share: the one data helper, small models, and checks that nothing changed.

    x, y = data(16, (3, 6, 6))                  # float64 inputs and class labels, fixed by the seed
    before = model_state(model); ...; assert_same_state(before, model_state(model))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autobatch.demo.models import Block, ResidualNet, StochasticBlock, StochasticNet

__all__ = ["BatchNormAct2d", "Block", "Flat", "ResidualNet", "StochasticBlock", "StochasticNet", "TinyLanguageModel",
           "assert_same_state", "compiled", "data", "interrupt_at", "mlp", "model_state", "padded_sequences",
           "token_loss_mean", "token_loss_sum", "variants"]


def data(n: int = 16, shape: tuple[int, ...] = (3, 6, 6), classes: int = 5, seed: int = 0,
         dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """``n`` inputs of ``shape`` (standard normal) and their class labels, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=generator, dtype=dtype),
            torch.randint(0, classes, (n,), generator=generator))


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter, gradient and buffer of ``model``, cloned, for 'nothing changed' checks."""
    state = {name: value.detach().clone() for name, value in model.state_dict(keep_vars=True).items()}
    for name, p in model.named_parameters():
        state[f"{name}.grad"] = None if p.grad is None else p.grad.clone()
    return state


def assert_same_state(before: dict[str, Tensor], after: dict[str, Tensor]) -> None:
    assert before.keys() == after.keys()
    for name, value in before.items():
        other = after[name]
        if value is None or other is None:
            assert value is None and other is None, name
        else:
            assert torch.equal(value, other), name


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


def mlp(features: int = 6, classes: int = 3, batch_norm: bool = False) -> nn.Module:
    norm = [nn.BatchNorm1d(16)] if batch_norm else []
    return nn.Sequential(nn.Linear(features, 16), *norm, nn.Tanh(), nn.Linear(16, classes))


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


def interrupt_at(target: int, where):
    """A trace function for ``sys.settrace`` that sends SIGINT (Ctrl-C as Python delivers it) at the
    ``target``-th line run in code for which ``where(code)`` is true; returns it and a counter of those lines."""
    import signal

    seen = [0]

    def trace(frame, event, arg):
        if not where(frame.f_code):
            return None

        def local(frame, event, arg):
            if event == "line":
                seen[0] += 1
                if seen[0] == target:
                    signal.raise_signal(signal.SIGINT)
            return local
        return local

    return trace, seen


class AreaLaterNet(nn.Module):
    """``H * W`` of bn0's output read a group later (timm's lambda layers read such a product of sizes)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 3, 1) for _ in range(4))
        self.bns = nn.ModuleList(nn.BatchNorm2d(3) for _ in range(4))

    def forward(self, x):
        h = self.bns[0](self.convs[0](x))
        area = h.shape[2] * h.shape[3]
        for conv, bn in zip(self.convs[1:], self.bns[1:]):
            h = bn(conv(h))
        return h.sum((2, 3)) / area
