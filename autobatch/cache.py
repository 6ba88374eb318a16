"""The plan cache: a fitted memory line kept across launches, keyed by what changes memory.

    >>> cache = PlanCache()                       # $AUTOBATCH_CACHE_DIR, else ~/.cache/autobatch
    >>> key = plan_key(model=model, batch=batch, ...)
    >>> cache.load(key)                           # None when absent, corrupt or stale (with a warning)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import tempfile
from typing import Any, Optional, Union

import torch
from torch import nn

from autobatch.split import leaves

__all__ = ["PlanCache", "default_cache_dir", "plan_key"]

log = logging.getLogger(__name__)

#: Bumped whenever what a record means changes; older records are ignored as stale.
FORMAT = 1


def default_cache_dir() -> pathlib.Path:
    if os.environ.get("AUTOBATCH_CACHE_DIR"):
        return pathlib.Path(os.environ["AUTOBATCH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "autobatch"


def _describe_batch(batch: Any) -> list[str]:
    return [f"{path}:{tuple(leaf.shape[1:])}:{leaf.dtype}" if isinstance(leaf, torch.Tensor)
            else f"{path}:{type(leaf).__name__}" for path, leaf in leaves(batch)]


def plan_key(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, device_name: str,
             device_total_bytes: int, **settings: Any) -> str:
    """A digest of what a step's memory depends on: structure and shapes, inputs, optimizer, device,
    torch version, and ``settings`` (autocast dtype, bn mode, budget, world size, target batch...)."""
    description = {
        "format": FORMAT,
        "modules": [f"{name}:{type(module).__module__}.{type(module).__qualname__}"
                    for name, module in model.named_modules()],
        "tensors": [f"{name}:{tuple(t.shape)}:{t.dtype}:{t.requires_grad}"
                    for name, t in list(model.named_parameters()) + list(model.named_buffers())],
        "inputs": _describe_batch(batch),
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "device": [device_name, device_total_bytes],
        "torch": torch.__version__,
        "settings": {key: str(value) for key, value in sorted(settings.items())},
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


class PlanCache:
    """Plan records in one JSON file; a corrupt file or record is ignored with a warning, never fatal."""

    def __init__(self, directory: Union[str, os.PathLike, None] = None):
        self.path = pathlib.Path(directory or default_cache_dir()) / "plans.json"

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as error:
            log.warning("cannot read the plan cache %s (%s); measuring afresh", self.path, error)
            return {}
        try:
            records = json.loads(text)
            if not isinstance(records, dict):
                raise ValueError("not a JSON object")
            return records
        except ValueError as error:
            log.warning("ignoring the corrupt plan cache %s (%s); it will be rewritten", self.path, error)
            return {}

    def load(self, key: str) -> Optional[dict[str, Any]]:
        record = self._read().get(key)
        if record is None:
            return None
        needed = {"format", "micro_batch", "fixed_bytes", "per_sample_bytes", "points"}
        if not isinstance(record, dict) or not needed <= record.keys() or record["format"] != FORMAT:
            log.warning("ignoring a stale plan cache record in %s; measuring afresh", self.path)
            return None
        return record

    def store(self, key: str, record: dict[str, Any]) -> None:
        records = self._read()
        records[key] = {"format": FORMAT, **record}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Written aside and renamed, so that concurrent launches never read half a file.
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as f:
                json.dump(records, f, indent=1)
            os.replace(f.name, self.path)
        except OSError as error:
            log.warning("cannot write the plan cache %s (%s); the plan is not kept", self.path, error)
