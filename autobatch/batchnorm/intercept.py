"""Training-mode ``F.batch_norm`` calls routed to autobatch's handlers, on the calling thread alone.

    with intercept_batch_norm(handler):       # this thread's training-mode calls go to handler
        loss_fn(model(inputs), targets).backward()

The intercept is a `torch.overrides.TorchFunctionMode` on the calling thread's own mode stack:
nn.BatchNorm1d/2d/3d and layers such as timm's BatchNormAct2d call ``F.batch_norm``, which asks
the active modes first. Nothing process-wide is patched, so:

- another thread never sees it: two threads each training their own model, or a third thread
  training BatchNorm of its own, never reach each other's handlers;
- a backward started inside the block sees it too, in the calling thread as in the autograd
  engine's own threads (a CUDA backward, and with it checkpointing's recomputation): the engine
  runs under the state of the thread that started it, mode stack included (NOTE below);
- a Ctrl-C that cuts a ``with`` short leaves at most a mode on this thread's stack, which the
  step's transaction pops (autobatch.transaction.ThreadContexts), and a mode whose ``with`` is
  over hands every call on to PyTorch.

The innermost intercept takes a call. A handler computes with ``torch.batch_norm`` or the aten
ops, which no intercept takes, never with ``F.batch_norm`` (that would reach the next intercept out).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, ContextManager, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
from torch.overrides import TorchFunctionMode, _pop_mode, _push_mode

#: What backward(inputs=...) takes for one input besides a tensor (torch >= 2.3).
GradientEdge = getattr(torch.autograd.graph, "GradientEdge", torch.Tensor)

try:
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # torch < 2.4: the engine's own entry, which that helper wraps
    from torch.autograd.variable import Variable

    def _engine_run_backward(*args: Any, **kwargs: Any) -> Any:
        return Variable._execution_engine.run_backward(*args, **kwargs)

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

#: PyTorch's function, as the modes recognise it.
_BATCH_NORM = F.batch_norm
_PARAMETERS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


def _training_call(args: tuple, kwargs: dict) -> Optional[BatchNormCall]:
    """The call's arguments where it normalizes with batch statistics; None for an eval-mode call."""
    bound = {**_DEFAULTS, **dict(zip(_PARAMETERS, args)), **kwargs}
    if not bound["training"]:
        return None
    return BatchNormCall(bound["input"], bound["running_mean"], bound["running_var"], bound["weight"],
                         bound["bias"], bound["momentum"], bound["eps"])


# NOTE [The intercept stays through backward]
# A mode's __torch_function__ runs with the mode popped, and backward() is itself a torch function:
# Tensor.backward and torch.autograd.backward ask the modes first, and a mode that hands the call on
# (``func(*args)``) asks the next one, so the function's body, which starts the engine, only runs once
# every mode is popped. The engine takes the mode stack as it is at that moment, and so would run
# checkpointing's recomputation of a BatchNorm without the intercept (measured: routed in the forward,
# PyTorch's own in the recomputation). The intercept therefore runs those two entry points' body itself,
# with its own mode pushed back, through the same helpers torch.autograd.backward uses. Worked example,
# the stack written bottom to top, A the intercept:
#   loss.backward()             stack [A]     A takes Tensor.backward: stack [] while it handles it
#   A pushes itself back        stack [A]     and starts the engine as torch.autograd.backward would
#   engine, recomputation       stack [A]     F.batch_norm reaches A's handler
# torch.autograd.grad is handed on as PyTorch hands it on (no recomputation is routed under it).


def _backward_under(mode: TorchFunctionMode, func: Callable, args: tuple, kwargs: dict) -> None:
    """``func`` (Tensor.backward or torch.autograd.backward) run with ``mode`` on the stack for the engine."""
    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    given = bound.arguments
    if func is torch.Tensor.backward:
        tensors, grads = given["self"], given["gradient"]
    else:
        tensors, grads = given["tensors"], given["grad_tensors"]
        if given.get("grad_variables") is not None:
            return func(*args, **kwargs)  # the deprecated spelling: PyTorch's own path, as before
    inputs = given["inputs"]
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    inputs = () if inputs is None else (inputs,) if isinstance(inputs, (torch.Tensor, GradientEdge)) else tuple(inputs)
    if given["inputs"] is not None and not inputs:
        raise RuntimeError("'inputs' argument to backward() cannot be empty.")  # as PyTorch says it
    create_graph = given["create_graph"]
    retain_graph = create_graph if given["retain_graph"] is None else given["retain_graph"]
    grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grads, len(tensors)), is_grads_batched=False)
    _push_mode(mode)
    try:
        _engine_run_backward(tensors, grads, retain_graph, create_graph, inputs, allow_unreachable=True,
                             accumulate_grad=True)
    finally:
        _pop_mode()


_BACKWARDS = (torch.Tensor.backward, torch.autograd.backward)


class _Intercept(TorchFunctionMode):
    """The mode `intercept_batch_norm` returns: every other torch function runs as called."""

    def __init__(self, handler: Handler):
        super().__init__()
        self._handler = handler
        #: False once its ``with`` is over: left on a stack by a Ctrl-C, it routes nothing.
        self._live = False

    def __enter__(self) -> "_Intercept":
        self._live = True
        return super().__enter__()

    def __exit__(self, *exc_info: Any) -> None:
        self._live = False
        super().__exit__(*exc_info)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func in _BACKWARDS and self._live:
            return _backward_under(self, func, args, kwargs)
        call = _training_call(args, kwargs) if func is _BATCH_NORM and self._live else None
        if call is None:
            return func(*args, **kwargs)
        return self._handler(call)


def intercept_batch_norm(handler: Handler) -> ContextManager[None]:
    """Route this thread's training-mode ``F.batch_norm`` calls (and those the autograd engine makes for
    its backward) to ``handler`` inside the block."""
    return _Intercept(handler)
