"""The computations autobatch is judged against: the full batch's gradient, plain accumulation, and
the forum user's frozen-statistics scheme (reproduced here only, to show why it fails: it is not a
mode of autobatch). For tests and benchmarks, and for checking autobatch on a model of your own.

Example:
    ```python
    expected = full_batch_grad(model, x, y, loss_fn)  # the model itself is untouched
    got = ...  # autobatch's gradient, read in before_step
    cosine(got, expected), relative_error(got, expected)
    ```
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

from autobatch.batchnorm.full_batch import FullBatchStatistics
from autobatch.batchnorm.intercept import BatchNormCall, intercept_batch_norm
from autobatch.batchnorm.statistics import batch_norm_modules
from autobatch.split import split_batch
from autobatch.transaction import BatchNormState

__all__ = ["cosine", "flat_grad", "frozen_statistics_backward", "frozen_statistics_grad", "full_batch_grad",
           "plain_accumulation_backward", "plain_accumulation_grad", "relative_error"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def flat_grad(model: nn.Module) -> Tensor:
    """``model``'s gradients as one flat vector, in parameter order (parameters without one left out)."""
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def relative_error(a: Tensor, b: Tensor) -> float:
    """``|a - b| / |b|``, computed in float64."""
    a, b = a.double(), b.double()  # float64 sums: float32 ones over millions of elements drift
    return ((a - b).norm() / b.norm()).item()


def cosine(a: Tensor, b: Tensor) -> float:
    """The cosine of the angle between two flat gradients, computed in float64."""
    # In float64: float32 sums over tens of millions of elements read a cosine above 1 (1.003 measured).
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()


def full_batch_grad(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    """The true gradient of the logical batch's mean loss (on a copy: the model is untouched)."""
    model = copy.deepcopy(model)
    loss_fn(model(x), y).backward()
    return flat_grad(model)


def plain_accumulation_backward(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn,
                                splits: list[int]) -> None:
    """Ordinary accumulation into ``model``'s gradients: each micro-batch normalized with its own
    statistics (and running statistics updated once per micro-batch), as users do today."""
    for xs, ys in split_batch((x, y), splits):
        (loss_fn(model(xs), ys) * (len(xs) / len(x))).backward()


def frozen_statistics_backward(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn,
                               splits: list[int]) -> None:
    """The forum's two-phase scheme into ``model``'s gradients: phase 1 records full-batch statistics
    (updating running statistics once); phase 2 uses them as constants."""
    two_pass = FullBatchStatistics({})
    state = BatchNormState(batch_norm_modules(model))
    with torch.no_grad(), intercept_batch_norm(two_pass.record):
        model(x)
    state.forwards_done(1)
    cursor = iter(range(10**9))

    def frozen(call: BatchNormCall) -> Tensor:
        layer = two_pass.layers[next(cursor) % len(two_pass.layers)]
        # Autograd through eval-mode batch_norm treats mean and var as constants: the forum's backward.
        return torch.batch_norm(call.input, call.weight, call.bias, layer.mean, layer.var, False, 0.0,
                                layer.eps, False)

    with intercept_batch_norm(frozen):
        plain_accumulation_backward(model, x, y, loss_fn, splits)
    state.count_once()


def plain_accumulation_grad(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn,
                            splits: list[int]) -> Tensor:
    """`plain_accumulation_backward`'s gradient, on a copy: the model is untouched."""
    model = copy.deepcopy(model)
    plain_accumulation_backward(model, x, y, loss_fn, splits)
    return flat_grad(model)


def frozen_statistics_grad(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn,
                           splits: list[int]) -> Tensor:
    """`frozen_statistics_backward`'s gradient, on a copy: the model is untouched."""
    model = copy.deepcopy(model)
    frozen_statistics_backward(model, x, y, loss_fn, splits)
    return flat_grad(model)
