"""The plan cache: the memory model kept across launches, keyed by what changes memory.

    >>> cache = PlanCache(directory)              # wrap's cache: $AUTOBATCH_CACHE_DIR, else ~/.cache/autobatch
    >>> key = plan_key(model=model, batch=batch, ...)
    >>> cache.load(key, share=16)                 # a PlanRecord; None when absent, corrupt or invalid (warned)
    >>> cache.store(key, record)

A file is read with bounds (its size, its nesting) and its record checked against this run
(autobatch.planning.record); files are written whole, renamed into place, readable as the umask allows.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import stat
import uuid
from typing import Any, Optional, Union

import torch
from torch import nn

from autobatch.planning.record import FORMAT, PlanRecord
from autobatch.split import BatchFormat, NestedFormat

__all__ = ["PlanCache", "plan_key"]

log = logging.getLogger(__name__)

#: A record is a few hundred bytes; anything far larger is not one of ours.
MAX_BYTES = 1 << 20


def _describe_optimizer(optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's class and every group's settings (amsgrad, foreach...), which size its state."""
    groups = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    return [f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"] + [
        json.dumps(group, sort_keys=True, default=str) for group in groups]


def plan_key(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, device_name: str,
             device_total_bytes: int, batches: BatchFormat = NestedFormat(), **settings: Any) -> str:
    """A digest of what a step's memory depends on: structure, each module's configuration (a conv's
    stride changes its activations, not its parameters), shapes and strides, inputs, the optimizer and
    its settings, device, torch version, and ``settings`` (autocast dtype, bn mode, budget, world size...).
    ``batches`` describes the batch (autobatch.split)."""
    description = {
        "format": FORMAT,
        "modules": [f"{name}:{type(module).__module__}.{type(module).__qualname__}({module.extra_repr()})"
                    for name, module in model.named_modules()],
        "tensors": [f"{name}:{tuple(t.shape)}:{t.stride()}:{t.dtype}:{t.requires_grad}"
                    for name, t in list(model.named_parameters()) + list(model.named_buffers())],
        "inputs": batches.describe(batch),
        "optimizer": _describe_optimizer(optimizer),
        "device": [device_name, device_total_bytes],
        "torch": torch.__version__,
        "settings": {key: str(value) for key, value in sorted(settings.items())},
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _read_regular(path: pathlib.Path) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most MAX_BYTES: a FIFO would block the step (opened
    without waiting here), a link to a device such as /dev/zero would read without end."""
    handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise ValueError("not a regular file")
        with os.fdopen(handle, "rb", closefd=False) as f:
            data = f.read(MAX_BYTES + 1)
    finally:
        os.close(handle)
    if len(data) > MAX_BYTES:
        raise ValueError(f"more than {MAX_BYTES} bytes, more than a plan record holds")
    return data


class PlanCache:
    """One JSON file per key, written whole and renamed into place: concurrent launches never lose
    each other's records or read half a file. A file that cannot be read or holds an invalid record
    is ignored with a warning naming it, never fatal."""

    def __init__(self, directory: Union[str, os.PathLike]):
        self.directory = pathlib.Path(directory) / "plans"

    def path(self, key: str) -> pathlib.Path:
        return self.directory / f"{key}.json"

    def load(self, key: str, share: Optional[int] = None) -> Optional[PlanRecord]:
        """The record under ``key``, checked against a run whose rank holds ``share`` samples; None if
        there is none or it is unusable (with a warning naming the file)."""
        path = self.path(key)
        try:
            data = json.loads(_read_regular(path).decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as error:  # RecursionError: nested too deep to be ours
            log.warning("ignoring the unreadable plan cache file %s (%s); measuring afresh", path,
                        type(error).__name__ if isinstance(error, RecursionError) else error)
            return None
        try:
            return PlanRecord.from_json(data, share)
        except ValueError as problem:
            log.warning("ignoring the plan cache file %s (%s); measuring afresh", path, problem)
            return None

    def store(self, key: str, record: PlanRecord) -> None:
        path = self.path(key)
        temporary = self.directory / f".{key}.{uuid.uuid4().hex}.tmp"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # os.open's mode passes through the umask, as a shared cache directory needs; a named
            # temporary file would be 0600 whatever the umask.
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(handle, "w") as f:
                json.dump(record.to_json(), f, indent=1)
            os.replace(temporary, path)
        except OSError as error:
            log.warning("cannot write the plan cache file %s (%s); the plan is not kept", path, error)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
