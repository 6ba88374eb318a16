"""Everything a trial training step touches, saved and put back.

    with preserved(model, optimizer):
        ...   # real training steps; afterwards parameters, gradients, optimizer state,
              # buffers (BatchNorm running statistics, num_batches_tracked), RNG and modes are as before
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["preserved"]


def _to_host(value: Any) -> Any:
    # Kept on the host so that the copies do not count against the device memory being measured.
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value


@contextlib.contextmanager
def preserved(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Run the body, then restore the model, its gradients, the optimizer's state, RNG and modes."""
    tensors = list(model.parameters()) + list(model.buffers())
    values = [_to_host(t) for t in tensors]
    grads = {id(p): p.grad for p in model.parameters()}
    optimizer_params = [p for group in optimizer.param_groups for p in group["params"]]
    grads.update({id(p): p.grad for p in optimizer_params})
    state = {p: {k: (_to_host(v), v.device if isinstance(v, torch.Tensor) else None) for k, v in s.items()}
             for p, s in optimizer.state.items()}
    modes = [(module, module.training) for module in model.modules()]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    # The body's backward would accumulate into the saved gradients in place: it starts without any.
    for p in list(model.parameters()) + optimizer_params:
        p.grad = None
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, values):
                tensor.copy_(value)
        for p in list(model.parameters()) + optimizer_params:
            p.grad = grads[id(p)]
        optimizer.state.clear()
        for p, saved in state.items():
            optimizer.state[p] = {k: v if device is None else v.to(device) for k, (v, device) in saved.items()}
        for module, training in modes:
            module.training = training
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
