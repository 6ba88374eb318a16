"""Byte counts read from and written for people: ``"6GiB"`` and ``6.00 GiB``.

    >>> parse_bytes("6GiB")
    6442450944
    >>> format_bytes(6442450944)
    '6.00 GiB'
"""
from __future__ import annotations

import math
import re

__all__ = ["format_bytes", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def parse_bytes(text: str) -> int:
    """'6GiB', '500 MB', '1.5e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size; write it like '6GiB', '500MB' or 4000000000")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite memory size; write it like '6GiB', '500MB' or 4000000000")
    return int(value)
