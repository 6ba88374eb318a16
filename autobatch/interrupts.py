"""Ctrl-C held back while autobatch puts shared state together or back, and raised right after.

    with held_interrupts():          # a SIGINT arriving in the block is raised when the block ends
        F.dropout, F.scaled_dot_product_attention = dropout, attention   # ...two lines that belong together

Python delivers SIGINT as a KeyboardInterrupt between any two bytecodes of the main thread; a
user who catches it (to save a checkpoint, as Lightning does) would then save a half-restored
model, and a function swapped for a while and half put back would stay swapped. Only the main
thread receives signals, and only where Python's own handler is installed is the signal held: a
handler of the user's own runs as it would.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

__all__ = ["held_interrupts"]


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) until the block ends, then raise KeyboardInterrupt; nested blocks hold it to
    the outermost's end."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received: list[Any] = []
    signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if received:
            raise KeyboardInterrupt
