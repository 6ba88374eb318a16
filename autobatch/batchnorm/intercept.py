"""Training-mode ``F.batch_norm`` calls routed to autobatch's handlers, thread by thread.

    with intercept_batch_norm(handler, layers):   # this thread's training-mode calls go to handler
        loss_fn(model(inputs), targets).backward()

While any intercept is active in the process, ``F.batch_norm`` is a router (nn.BatchNorm1d/2d/3d
and layers such as timm's BatchNormAct2d look it up at each call); the last intercept to end puts
PyTorch's function back. A call goes to the innermost handler of its own thread; in a thread with
none, to the handler that owns the layer's tensors (``layers``): the autograd engine runs a CUDA
backward, and so checkpointing's recomputation, in a thread of its own. Every other call is
PyTorch's own, so two threads each training their own model, or a third thread training
BatchNorm of its own, never reach each other's handlers.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BatchNormCall", "intercept_batch_norm"]


class BatchNormCall(NamedTuple):
    """The arguments of one training-mode ``F.batch_norm`` call."""

    input: Tensor
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    momentum: float
    eps: float

    @property
    def values_per_channel(self) -> int:
        return self.input.numel() // self.input.shape[1]


Handler = Callable[[BatchNormCall], Tensor]

_lock = threading.Lock()
#: This thread's handlers, innermost last.
_local = threading.local()
#: The handlers that own a layer's tensors, by the tensor's id, innermost last (any thread's).
_owners: dict[int, list[Handler]] = {}
_active = 0
_original: Callable[..., Tensor] = F.batch_norm


def _handler(tensors: tuple[Optional[Tensor], ...]) -> Optional[Handler]:
    handlers = getattr(_local, "handlers", None)
    if handlers:
        return handlers[-1]
    for tensor in tensors:
        owners = _owners.get(id(tensor)) if tensor is not None else None
        if owners:
            return owners[-1]
    return None


def _route(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
           weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
           momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    handler = _handler((weight, running_mean, bias, running_var)) if training else None
    if handler is None:
        return _original(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return handler(BatchNormCall(input, running_mean, running_var, weight, bias, momentum, eps))


def _owned(layers: Sequence[nn.Module]) -> list[int]:
    return [id(tensor) for layer in layers
            for tensor in (layer.weight, layer.running_mean, layer.bias, layer.running_var) if tensor is not None]


@contextlib.contextmanager
def intercept_batch_norm(handler: Handler, layers: Sequence[nn.Module] = ()) -> Iterator[None]:
    """Route this thread's training-mode ``F.batch_norm`` calls to ``handler``, and those of
    ``layers`` (BatchNorm modules) in threads that have no handler of their own."""
    global _active, _original
    owned = _owned(layers)
    with _lock:
        if _active == 0 and F.batch_norm is not _route:
            _original, F.batch_norm = F.batch_norm, _route
        _active += 1
        for key in owned:
            _owners.setdefault(key, []).append(handler)
    handlers = _local.__dict__.setdefault("handlers", [])
    handlers.append(handler)
    try:
        yield
    finally:
        handlers.pop()
        with _lock:
            for key in owned:
                _owners[key].remove(handler)
                if not _owners[key]:
                    del _owners[key]
            _active -= 1
            if _active == 0 and F.batch_norm is _route:
                F.batch_norm = _original
