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

import threading
import weakref
from typing import Any, Callable, ContextManager, NamedTuple, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from autobatch.interrupts import held_interrupts

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


class _Entry(NamedTuple):
    """One active intercept: its handler, the tensors it owns, its thread, and its context manager."""

    handler: Handler
    owned: list[int]
    thread: threading.Thread
    #: The intercept while anyone holds it: dead once its ``with`` is over, cleaned up or not.
    manager: "weakref.ref[_Intercept]"


#: Every active intercept, of every thread, oldest first.
_entries: list[_Entry] = []


class _Intercept:
    """The context manager `intercept_batch_norm` returns."""

    def __init__(self, handler: Handler, layers: Sequence[nn.Module]):
        self._entry = _Entry(handler, _owned(layers), threading.current_thread(), weakref.ref(self))
        self._installed = False

    def __enter__(self) -> None:
        global _active, _original
        entry = self._entry
        # Installed and taken down whole: a Ctrl-C half-way would leave a router with stale owners. One that
        # lands before the clean-up can start leaves the entry behind, and the next entry takes it down.
        with held_interrupts(), _lock:
            _repair()
            if _active == 0 and F.batch_norm is not _route:
                _original, F.batch_norm = F.batch_norm, _route
            _active += 1
            for key in entry.owned:
                _owners.setdefault(key, []).append(entry.handler)
            _local.__dict__.setdefault("handlers", []).append(entry.handler)
            _entries.append(entry)
            self._installed = True

    def __exit__(self, *exc_info: Any) -> None:
        with held_interrupts(), _lock:
            if self._installed:
                self._installed = False
                _remove(self._entry)


def intercept_batch_norm(handler: Handler, layers: Sequence[nn.Module] = ()) -> ContextManager[None]:
    """Route this thread's training-mode ``F.batch_norm`` calls to ``handler``, and those of
    ``layers`` (BatchNorm modules) in threads that have no handler of their own."""
    return _Intercept(handler, layers)


def _remove(entry: _Entry) -> None:
    """Take one intercept down (under the lock); PyTorch's function back when it was the last."""
    global _active
    _entries.remove(entry)
    handlers = _local.__dict__.get("handlers", []) if entry.thread is threading.current_thread() else []
    if entry.handler in handlers:
        del handlers[len(handlers) - 1 - handlers[::-1].index(entry.handler)]
    for key in entry.owned:
        _owners[key].remove(entry.handler)
        if not _owners[key]:
            del _owners[key]
    _active -= 1
    if _active == 0 and F.batch_norm is _route:
        F.batch_norm = _original


def _repair() -> None:
    """Take down the intercepts whose ``with`` is over but whose clean-up a Ctrl-C kept from starting (their
    context manager is gone), and those of threads that ended."""
    for entry in [e for e in _entries if e.manager() is None or not e.thread.is_alive()]:
        _remove(entry)
