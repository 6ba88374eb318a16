"""The plan cache: a fitted memory line kept across launches, keyed by what changes memory.

    >>> cache = PlanCache()                       # $AUTOBATCH_CACHE_DIR, else ~/.cache/autobatch
    >>> key = plan_key(model=model, batch=batch, ...)
    >>> cache.load(key)                           # None when absent, corrupt or invalid (with a warning)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pathlib
import tempfile
from typing import Any, Optional, Union

import torch
from torch import nn

from autobatch.split import BatchFormat, NestedFormat

__all__ = ["PlanCache", "default_cache_dir", "plan_key"]

log = logging.getLogger(__name__)

#: Bumped whenever what a record means changes; older records are ignored as stale.
FORMAT = 2


def default_cache_dir() -> pathlib.Path:
    if os.environ.get("AUTOBATCH_CACHE_DIR"):
        return pathlib.Path(os.environ["AUTOBATCH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "autobatch"


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


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _size(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _problem(record: Any) -> Optional[str]:
    """What makes a record unusable, or None: every field is checked before a plan is built from it."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("format") != FORMAT:
        return f"format {record.get('format')!r}, not {FORMAT}"
    if not _positive_int(record.get("micro_batch")):
        return f"micro_batch {record.get('micro_batch')!r} is not a positive integer"
    for name in ("fixed_bytes", "per_sample_bytes"):
        if not _size(record.get(name)):
            return f"{name} {record.get(name)!r} is not a size in bytes"
    points = record.get("points")
    if not isinstance(points, list) or not all(
            isinstance(p, list) and len(p) == 2 and _positive_int(p[0]) and (p[1] is None or _size(p[1]))
            for p in points):
        return "points are not [micro_batch, peak bytes] pairs"
    if not _positive_int(record.get("phase1_chunks", 1)):
        return f"phase1_chunks {record.get('phase1_chunks')!r} is not a positive integer"
    if not isinstance(record.get("lockstep_fits", False), bool):
        return f"lockstep_fits {record.get('lockstep_fits')!r} is not true or false"
    if not isinstance(record.get("bn", ""), str) or not isinstance(record.get("label", ""), str):
        return "bn or label is not a string"
    checkpointed = record.get("checkpointed", [])
    if not isinstance(checkpointed, list) or not all(isinstance(name, str) for name in checkpointed):
        return "checkpointed is not a list of module names"
    if not isinstance(record.get("selective", False), bool):
        return f"selective {record.get('selective')!r} is not true or false"
    return None


class PlanCache:
    """One JSON file per key, written whole and renamed into place: concurrent launches never lose
    each other's records or read half a file. A file that cannot be read or holds an invalid record
    is ignored with a warning naming it, never fatal."""

    def __init__(self, directory: Union[str, os.PathLike, None] = None):
        self.directory = pathlib.Path(directory or default_cache_dir()) / "plans"

    def path(self, key: str) -> pathlib.Path:
        return self.directory / f"{key}.json"

    def load(self, key: str) -> Optional[dict[str, Any]]:
        path = self.path(key)
        try:
            record = json.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            log.warning("ignoring the unreadable plan cache file %s (%s); measuring afresh", path, error)
            return None
        problem = _problem(record)
        if problem is not None:
            log.warning("ignoring the plan cache file %s (%s); measuring afresh", path, problem)
            return None
        return record

    def store(self, key: str, record: dict[str, Any]) -> None:
        path = self.path(key)
        temporary = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.directory, delete=False, suffix=".tmp") as f:
                temporary = f.name
                json.dump({"format": FORMAT, **record}, f, indent=1)
            os.replace(temporary, path)
            temporary = None
        except OSError as error:
            log.warning("cannot write the plan cache file %s (%s); the plan is not kept", path, error)
        finally:
            if temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
