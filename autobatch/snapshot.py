"""Everything a training step touches, saved and put back.

    with preserved(model, optimizer):
        ...   # real training steps; afterwards parameters, gradients, optimizer state,
              # buffers (BatchNorm running statistics, num_batches_tracked), RNG and modes are as before
    with undone_on_error(params, optimizer, scaler):
        optimizer.step()   # on any error, parameters and optimizer state exactly as before
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal, Optional, Sequence

import torch
from torch import nn

__all__ = ["UPDATE_COPIES", "UpdateCopies", "preserved", "undone_on_error"]


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


UpdateCopies = Literal["device", "host", "none"]
#: Where ``undone_on_error`` keeps its copies (``wrap(..., update_copies=...)``).
UPDATE_COPIES: tuple[UpdateCopies, ...] = ("device", "host", "none")


def _copy(value: Any, host: bool = False) -> Any:
    """A copy of ``value`` and where it belongs: on its device, or with ``host`` in host memory."""
    if not isinstance(value, torch.Tensor):
        return value, None
    copied = value.detach().to("cpu", copy=True) if host else value.detach().clone()
    return copied, value.device


def _back(saved: tuple[Any, Any]) -> Any:
    value, device = saved
    return value if device is None else value.to(device)


@contextlib.contextmanager
def undone_on_error(params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
                    scaler: Optional[torch.amp.GradScaler] = None, copies: UpdateCopies = "device") -> Iterator[None]:
    """Run an optimizer update that either completes or, on any error (out of memory included),
    leaves ``params``, the optimizer's state and hyperparameters and the scaler as before it.

    PyTorch's optimizers update their state in place before they allocate their temporaries, so
    an error half-way leaves a half-applied step. ``copies``: "device" keeps the copies on the device,
    where the step's memory is lowest (activations freed; the planner's trials measure them); "host"
    in host memory (no device memory, a device-to-host copy per step); "none" takes none and undoes
    nothing.
    """
    if copies == "none":
        yield
        return
    host = copies == "host"
    # PyTorch's optimizers skip parameters without a gradient (frozen layers): nothing to copy there.
    params = [p for p in params if p.grad is not None]
    values = [_copy(p, host)[0] for p in params]
    state = {p: {k: _copy(v, host) for k, v in optimizer.state[p].items()} for p in params if p in optimizer.state}
    settings = [{k: _copy(v)[0] for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    # GradScaler's scale, growth tracker and record of this optimizer's unscale_ (private: it has no API).
    scale = [_copy(getattr(scaler, name, None))[0] for name in ("_scale", "_growth_tracker")]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for p, value in zip(params, values):
                p.copy_(value)
        for p in params:
            if p in state:
                optimizer.state[p] = {k: _back(saved) for k, saved in state[p].items()}
            else:
                optimizer.state.pop(p, None)
        for group, saved in zip(optimizer.param_groups, settings):
            group.update(saved)
        if scaler is not None:
            for name, value in zip(("_scale", "_growth_tracker"), scale):
                if isinstance(value, torch.Tensor):
                    getattr(scaler, name).copy_(value)
            getattr(scaler, "_per_optimizer_states", {}).pop(id(optimizer), None)
        raise
