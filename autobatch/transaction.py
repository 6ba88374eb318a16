"""What a step may change, saved on entry and put back: on any exception, or always (a planner's trial).

One mechanism serves every use: a `Transaction` saves its parts when it is entered, before the
body changes anything, and puts every part back when the body raises (or always, for a trial)::

    with Transaction(kept=lambda: Attributes([(ab, "plan")])):   # a whole step, its retries included
        with step_transaction(params, layers) as saved:           # one attempt at the logical batch
            ...      # micro-batches from cleared gradients; any exception: all as on entry, the
                     # gradients the caller held, BatchNorm buffers and the RNG
    with update_transaction(params, optimizer, scaler, copies="device", gradients=True):
        optimizer.step()                         # parameters, optimizer state, scaler (and gradients) undone on error
    with trial_transaction(model, optimizer):
        ...                                      # a planner's trial: afterwards everything is as before

Putting back is done in full even when it is interrupted (a KeyboardInterrupt between two tensors):
each part's restore is idempotent, so an interrupted pass starts again, and the interrupt is raised
once the model is whole.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
# PyTorch's own readers of the mode stacks (private, present since torch 2.0): nothing public pops a mode.
from torch.overrides import _get_current_function_mode_stack as _function_modes
from torch.overrides import _pop_mode as _pop_function_mode
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack as _dispatch_modes
from torch.utils._python_dispatch import _pop_mode as _pop_dispatch_mode

from autobatch.interrupts import held_interrupts
from autobatch.options import UpdateCopies

__all__ = ["Attributes", "BatchNormState", "ThreadContexts", "Transaction", "add_gradients", "put_back",
           "step_transaction", "trial_transaction", "undo_copy_bytes", "update_transaction", "warm_optimizer_state"]

#: Passes at putting state back when the restore itself is interrupted.
_ATTEMPTS = 3


def put_back(restores: Sequence[Callable[[], None]]) -> None:
    """Run every restore in order; one that raises (an interrupt, say) starts them all again, and the
    first error is raised once a full pass succeeded (or after the last pass failed)."""
    failure: Optional[BaseException] = None
    for _ in range(_ATTEMPTS):
        try:
            for restore in restores:
                restore()
        except BaseException as error:  # noqa: BLE001 - the state must be whole before anything is raised
            failure = failure or error
            continue
        break
    if failure is not None:
        raise failure


def _copy(value: Any, host: bool) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    return value.detach().to("cpu", copy=True) if host else value.detach().clone()


def _back(value: Any, like: Any) -> Any:
    """``value`` where ``like`` lives (a copy kept on the host goes back to its device)."""
    return value.to(like.device) if isinstance(value, torch.Tensor) and isinstance(like, torch.Tensor) else value


# -- the parts -----------------------------------------------------------------------------------------

class Gradients:
    """The tensors' ``.grad`` as they are (references: no memory), set back as they were."""

    def __init__(self, tensors: Iterable[torch.Tensor]):
        self._saved = [(t, t.grad) for t in tensors]

    def restore(self) -> None:
        for tensor, grad in self._saved:
            tensor.grad = grad

    def add_to_current(self) -> None:
        """The saved gradients added into the current ones, as a second ``backward()`` accumulates (the saved
        tensors themselves untouched, so that a failure half-way still restores them)."""
        add_gradients(self._saved)


def add_gradients(pairs: Iterable[tuple[torch.Tensor, Optional[torch.Tensor]]]) -> None:
    """Each ``(tensor, grad)``'s ``grad`` added into ``tensor.grad`` in place, as ``backward()`` accumulates
    (``grad`` itself untouched)."""
    with torch.no_grad():
        for tensor, grad in pairs:
            if grad is not None:
                if tensor.grad is None:
                    tensor.grad = grad
                else:
                    tensor.grad.add_(grad)


class Values:
    """Copies of tensors' values (``host``: in host memory), copied back in place; ``grads``: of their
    gradients instead."""

    def __init__(self, tensors: Iterable[torch.Tensor], host: bool = False, grads: bool = False):
        self._grads = grads
        self._saved = [(t, _copy(t.grad if grads else t, host)) for t in tensors]

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, value in self._saved:
                (tensor.grad if self._grads else tensor).copy_(value)


class OptimizerState:
    """The optimizer's per-parameter state for ``params`` (copies; ``host``: in host memory) and every
    group's settings (learning rate, betas...), put back; state it did not have is removed."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], host: bool = False):
        self._optimizer = optimizer
        self._params = list(params)
        self._state = {p: {k: _copy(v, host) for k, v in optimizer.state[p].items()}
                       for p in self._params if p in optimizer.state}
        self._settings = [{k: _copy(v, False) for k, v in group.items() if k != "params"}
                          for group in optimizer.param_groups]

    def restore(self) -> None:
        state = self._optimizer.state
        for p in self._params:
            if p in self._state:
                state[p] = {k: _back(v, p) for k, v in self._state[p].items()}
            else:
                state.pop(p, None)
        for group, saved in zip(self._optimizer.param_groups, self._settings):
            group.update(saved)


class ScalerState:
    """A GradScaler's scale, growth tracker and record of this optimizer's ``unscale_`` (private: it has
    no API for them)."""

    def __init__(self, scaler: Optional[torch.amp.GradScaler], optimizer: torch.optim.Optimizer):
        self._scaler, self._optimizer = scaler, optimizer
        self._values = [_copy(getattr(scaler, name, None), False) for name in ("_scale", "_growth_tracker")]

    def restore(self) -> None:
        if self._scaler is None:
            return
        for name, value in zip(("_scale", "_growth_tracker"), self._values):
            if isinstance(value, torch.Tensor):
                getattr(self._scaler, name).copy_(value)
        getattr(self._scaler, "_per_optimizer_states", {}).pop(id(self._optimizer), None)


class ThreadContexts:
    """What a context manager cut short by Ctrl-C leaves set for the rest of the thread: autograd off (a
    Ctrl-C inside ``torch.no_grad()``'s own ``__enter__``), or a torch function or dispatch mode still pushed
    (a Ctrl-C on the ``with`` line as the block ends, before the mode's ``__exit__`` runs), through which
    every later torch call of the process would run."""

    def __init__(self) -> None:
        self._enabled = torch.is_grad_enabled()
        self._function_modes = len(_function_modes())
        self._dispatch_modes = len(_dispatch_modes())

    def restore(self) -> None:
        torch.set_grad_enabled(self._enabled)
        while len(_function_modes()) > self._function_modes:
            _pop_function_mode()
        while len(_dispatch_modes()) > self._dispatch_modes:
            _pop_dispatch_mode()


class Modes:
    """Every module's train/eval mode."""

    def __init__(self, model: nn.Module):
        self._saved = [(module, module.training) for module in model.modules()]

    def restore(self) -> None:
        for module, training in self._saved:
            module.training = training


class RandomState:
    """The generators a step draws from: the host's and, where CUDA is in use, every GPU's. Put back,
    a step taken again draws the same dropout masks as the first time."""

    def __init__(self) -> None:
        self._host = torch.get_rng_state()
        self._cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None

    def restore(self) -> None:
        torch.set_rng_state(self._host)
        if self._cuda is not None:
            torch.cuda.set_rng_state_all(self._cuda)


class Attributes:
    """Attributes of Python objects (the plan, the planner's counters)."""

    def __init__(self, keep: Iterable[tuple[Any, str]]):
        self._saved = [(owner, name, getattr(owner, name)) for owner, name in keep]

    def restore(self) -> None:
        for owner, name, value in self._saved:
            setattr(owner, name, value)


class BatchNormState:
    """A snapshot of every BatchNorm buffer: undoes a failed step, and keeps each layer's
    ``num_batches_tracked`` counting a logical batch once although the layer runs once per micro-batch."""

    def __init__(self, modules: list[_BatchNorm]):
        self._buffers = [buffer for module in modules
                         for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
                         if buffer is not None]
        self._saved = [buffer.clone() for buffer in self._buffers]
        self._counters = [(module.num_batches_tracked, module.num_batches_tracked.clone()) for module in modules
                          if module.num_batches_tracked is not None]
        #: Each counter's steps in one forward of the model (a layer called twice per forward counts twice).
        self._per_forward: Optional[list[torch.Tensor]] = None

    def forwards_done(self, forwards: int) -> None:
        """The logical batch's first ``forwards`` forwards have run (phase 1's chunks, or the first micro-batch):
        what they counted, per forward, is what the logical batch counts. Later calls change nothing."""
        if self._per_forward is None and forwards > 0:
            self._per_forward = [torch.div(counter - before, forwards, rounding_mode="floor")
                                 for counter, before in self._counters]

    def count_once(self) -> None:
        """After the logical batch's forwards: each counter as one forward of the whole batch leaves it, however
        many forwards (phase 1's chunks, every micro-batch, recomputations) it ran."""
        # Integer buffers need no torch.no_grad(), whose __enter__ a Ctrl-C could leave half done (grad mode off).
        for (counter, before), steps in zip(self._counters, self._per_forward or [0] * len(self._counters)):
            counter.copy_(before + steps)

    def restore(self) -> None:
        """Put every buffer back as it was when the snapshot was taken."""
        with torch.no_grad():
            for buffer, saved in zip(self._buffers, self._saved):
                buffer.copy_(saved)


# -- the transaction ---------------------------------------------------------------------------------

class Transaction:
    """Saves ``parts`` (callables that save one part each, in order) on entry, then runs ``then`` (the
    first change, such as clearing gradients); puts every part back when the body raises, or with
    ``always`` whatever happens. ``transaction[name]`` is a saved part."""

    def __init__(self, always: bool = False, then: Optional[Callable[[], None]] = None, **parts: Callable[[], Any]):
        self._makers = parts
        self._always = always
        self._then = then
        self._committed = False
        self.parts: dict[str, Any] = {}

    def __enter__(self) -> "Transaction":
        # Every part is saved before anything changes: an error while saving leaves all whole. A Ctrl-C is
        # held to the end of the block, so that one arriving after ``then`` puts everything back here: the
        # body's ``with`` never starts, and its __exit__ would not.
        try:
            with held_interrupts():
                self.parts = {name: make() for name, make in self._makers.items()}
                if self._then is not None:
                    self._then()
            return self  # inside the try: an interrupt on this very line is put back too
        except BaseException:
            put_back([part.restore for part in self.parts.values()])
            raise

    def commit(self) -> None:
        """What the body changed stays, whatever is raised after (call it where the change is complete)."""
        self._committed = True

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if (kind is not None and not self._committed) or self._always:
            with held_interrupts():
                put_back([part.restore for part in self.parts.values()])

    def __getitem__(self, name: str) -> Any:
        return self.parts[name]


def _clear(params: Iterable[torch.Tensor]) -> Callable[[], None]:
    def clear() -> None:
        for p in params:
            p.grad = None
    return clear


def step_transaction(params: Sequence[nn.Parameter], layers: list[_BatchNorm]) -> Transaction:
    """One attempt at a logical batch: the gradients the caller held (then cleared: the micro-batches
    accumulate from none), BatchNorm buffers (``["buffers"]``, which also count ``num_batches_tracked``
    once) and the RNG, put back on any exception."""
    return Transaction(then=_clear(params), gradients=lambda: Gradients(params),
                       buffers=lambda: BatchNormState(layers), random=RandomState, contexts=ThreadContexts)


def update_transaction(params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer,
                       scaler: Optional[torch.amp.GradScaler] = None, copies: UpdateCopies = "device",
                       gradients: bool = False) -> Transaction:
    """An optimizer update that either completes or, on any error (out of memory included), leaves the
    parameters, the optimizer's state and settings, the scaler and (``gradients``: for updates that
    unscale or clip them in place) the gradients as before it.

    PyTorch's optimizers update their state in place before they allocate their temporaries, so an
    error half-way leaves a half-applied step. ``copies``: "device" keeps the copies on the device,
    where the step's memory is lowest (activations freed; the planner's trials measure them); "host"
    in host memory (no device memory, a device-to-host copy per step); "none" takes none and undoes
    nothing."""
    if copies == "none":
        return Transaction()
    host = copies == "host"
    # PyTorch's optimizers skip parameters without a gradient (frozen layers): nothing to copy there.
    stepped = [p for p in params if p.grad is not None]
    parts: dict[str, Callable[[], Any]] = {"values": lambda: Values(stepped, host)}
    if gradients:
        parts["gradients"] = lambda: Values(stepped, host, grads=True)
    parts["optimizer"] = lambda: OptimizerState(optimizer, stepped, host)
    parts["scaler"] = lambda: ScalerState(scaler, optimizer)
    return Transaction(**parts)


def undo_copy_bytes(params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer, gradients: bool = False) -> int:
    """The bytes `update_transaction` copies: every trained parameter, its optimizer state (from the first
    update on) and, with ``gradients``, its gradient."""
    trained = [p for p in params if p.requires_grad]
    state = [v for p in trained for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in trained * (2 if gradients else 1) + state)


def warm_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the state the optimizer keeps from its first step on (Adam's moments, SGD's momentum),
    so that measured steps see it resident, as every step after the first does. Changes parameters:
    call it where they are restored afterwards."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if all(p in optimizer.state and optimizer.state[p] for p in params):
        return
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in params:
        p.grad = None


def trial_transaction(model: nn.Module, optimizer: torch.optim.Optimizer) -> Transaction:
    """A planner's trial: the model's parameters and buffers, gradients (then cleared: a trial's backward
    would accumulate into them in place), the optimizer's state, modes and the RNG, all put back
    afterwards (copies in host memory: they do not count against the device memory being measured)."""
    optimizer_params = [p for group in optimizer.param_groups for p in group["params"]]
    params = list(dict.fromkeys(list(model.parameters()) + optimizer_params + list(optimizer.state)))
    return Transaction(always=True, then=_clear(params),
                       values=lambda: Values(list(model.parameters()) + list(model.buffers()), host=True),
                       gradients=lambda: Gradients(params),
                       optimizer=lambda: OptimizerState(optimizer, params, host=True),
                       modes=lambda: Modes(model), random=RandomState, contexts=ThreadContexts)
