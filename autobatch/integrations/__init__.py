"""autobatch inside the training frameworks people use: Hugging Face Accelerate and Transformers, PyTorch Lightning.

What the trainers' integrations share: a batch's gradient taken apart from the gradients already held, for
a trainer that scales it (the Trainer) or adds it later (Lightning clears gradients before its backward).

    loss, gradient = gradient_apart(ab, params, batch)    # params' .grad as before; gradient: [(p, grad)]
    add_gradients(gradient)                               # autobatch.transaction: added as backward() adds
"""
from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["gradient_apart"]


def gradient_apart(ab: Any, params: list[torch.nn.Parameter], batch: Any) -> tuple[float, list[tuple[
        torch.nn.Parameter, Optional[torch.Tensor]]]]:
    """``ab.backward(batch)``'s loss and the batch's gradient alone, per parameter; the ``.grad`` the
    parameters held are as before afterwards, whether it succeeds or raises."""
    before = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss = ab.backward(batch)
        return loss, [(p, p.grad) for p in params]
    finally:
        for p, grad in zip(params, before):
            p.grad = grad
