"""A module's ``forward`` swapped for a while: one helper for every place that needs it.

    with forward_replaced(model, other_forward):      # model(...) calls other_forward(...) inside
        loss_fn(model(inputs), targets)
    with forwards_replaced((m, checkpointed(m.forward)) for m in blocks):    # several at once
        ...
    swap = ForwardSwap(model, forward)                # put back by hand, even from inside ``forward``
    swap.restore()                                    # idempotent: the finally block may call it again

The swap is an instance attribute over the class's ``forward`` (what ``nn.Module.__call__`` calls);
putting it back removes that attribute, or restores the one the module had already, so that the
module's ``__dict__`` and ``state_dict`` are exactly as before.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

from torch import nn

__all__ = ["ForwardSwap", "forward_replaced", "forwards_replaced"]

Forward = Callable[..., Any]


class ForwardSwap:
    """``module(...)`` calls ``forward`` until `restore`."""

    def __init__(self, module: nn.Module, forward: Forward):
        self.module = module
        self._had = "forward" in module.__dict__
        self._own = module.__dict__.get("forward")
        module.forward = forward

    def restore(self) -> None:
        """The module's own forward back; running it again changes nothing."""
        if self._had:
            self.module.forward = self._own
        else:
            self.module.__dict__.pop("forward", None)


@contextlib.contextmanager
def forwards_replaced(replacements: Iterable[tuple[nn.Module, Forward]]) -> Iterator[None]:
    """Each ``(module, forward)`` swapped inside the block (taken one at a time, so that a replacement may
    wrap the forward before it); every one put back after, the last first."""
    swaps: list[ForwardSwap] = []
    try:
        for module, forward in replacements:
            swaps.append(ForwardSwap(module, forward))
        yield
    finally:
        for swap in reversed(swaps):
            swap.restore()


def forward_replaced(module: nn.Module, forward: Forward) -> contextlib.AbstractContextManager[None]:
    """``module(...)`` calls ``forward`` inside the block."""
    return forwards_replaced([(module, forward)])
