"""The computations autobatch is judged against: the full batch, plain accumulation, and the
forum user's frozen-statistics scheme (reproduced here only, to show why it fails)."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

from autobatch.batchnorm.full_batch import FullBatchStatistics
from autobatch.batchnorm.intercept import BatchNormCall, intercept_batch_norm
from autobatch.batchnorm.statistics import BatchNormState, batch_norm_modules
from autobatch.split import split_batch

__all__ = ["assert_same_state", "cosine", "flat_grad", "frozen_statistics_backward", "frozen_statistics_grad",
           "full_batch_grad", "model_state", "plain_accumulation_backward", "plain_accumulation_grad",
           "relative_error"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def flat_grad(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def relative_error(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def cosine(a: Tensor, b: Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


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
    state.mark_counted()
    cursor = iter(range(10**9))

    def frozen(call: BatchNormCall) -> Tensor:
        layer = two_pass.layers[next(cursor) % len(two_pass.layers)]
        # Autograd through eval-mode batch_norm treats mean and var as constants: the forum's backward.
        return torch.batch_norm(call.input, call.weight, call.bias, layer.mean, layer.var, False, 0.0,
                                layer.eps, False)

    with intercept_batch_norm(frozen):
        plain_accumulation_backward(model, x, y, loss_fn, splits)
    state.keep_counted()


def plain_accumulation_grad(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn,
                            splits: list[int]) -> Tensor:
    model = copy.deepcopy(model)
    plain_accumulation_backward(model, x, y, loss_fn, splits)
    return flat_grad(model)


def frozen_statistics_grad(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn,
                           splits: list[int]) -> Tensor:
    model = copy.deepcopy(model)
    frozen_statistics_backward(model, x, y, loss_fn, splits)
    return flat_grad(model)


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
