"""``wrap``'s options: checked once, before anything changes, and handed on as one frozen object.

    options = Options.build(model, optimizer, target_batch=16, loss_fn=criterion, bn="auto")
    options.agreed()      # what every rank must share, as numbers to compare
    options.keyed()       # what enters the plan cache's key

Each field declares in its metadata whether the ranks must agree on it (``agreed``: a function to a
number) and whether it enters the cache key (``keyed``: a function to text): one declaration, both uses.
Every error names the problem and the fix.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import pathlib
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import nn

from autobatch.modes import BN_MODES, LOCKSTEP_REMOVED, PHASE1_FORMATS, Auto, BatchNormMode, TwoPass, bn_mode, settled
from autobatch.sizes import parse_bytes
from autobatch.split import BatchFormat, batch_format

__all__ = ["MicroBatch", "Options", "UPDATE_COPIES", "UpdateCopies", "check_memory_budget", "check_micro_batch",
           "check_target_batch", "default_cache_dir"]

log = logging.getLogger(__name__)

MicroBatch = Union[int, Literal["auto"]]
UpdateCopies = Literal["device", "host", "none"]
#: Where the update's undo copies live (``wrap(..., update_copies=...)``).
UPDATE_COPIES: tuple[UpdateCopies, ...] = ("device", "host", "none")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_target_batch(target_batch: object) -> int:
    if not _is_int(target_batch) or target_batch < 1:
        raise ValueError(f"target_batch must be a positive int (the logical batch size), got {target_batch!r}")
    return target_batch


def check_micro_batch(micro_batch: object) -> MicroBatch:
    if micro_batch == "auto":
        return "auto"
    if not _is_int(micro_batch) or micro_batch < 1:
        raise ValueError(f"micro_batch must be 'auto' or a positive int, got {micro_batch!r}")
    return micro_batch


def check_memory_budget(memory_budget: Union[int, float, str, None]) -> None:
    """Raise a clear error unless ``memory_budget`` is None, positive bytes, a size string, or a fraction."""
    if memory_budget is None:
        return
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float, str)):
        raise TypeError(f"memory_budget must be bytes, a string such as '6GiB', or a fraction such as 0.8, "
                        f"got {memory_budget!r}")
    if isinstance(memory_budget, float) and not 0 < memory_budget <= 1:
        raise ValueError(f"a fractional memory_budget must lie in (0, 1], got {memory_budget}; "
                         "give bytes as an int or a string such as '6GiB'")
    if (parse_bytes(memory_budget) if isinstance(memory_budget, str) else memory_budget) <= 0:
        raise ValueError(f"memory_budget must be positive, got {memory_budget!r}")


def default_cache_dir() -> pathlib.Path:
    if os.environ.get("AUTOBATCH_CACHE_DIR"):
        return pathlib.Path(os.environ["AUTOBATCH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "autobatch"


def _cache_setting(cache: Any) -> tuple[Optional[pathlib.Path], bool]:
    """(directory or None for no cache, whether to measure afresh) from ``cache``: True, False, a
    directory, or "refresh" (measure afresh and keep the result)."""
    if cache is True or cache == "refresh":
        return default_cache_dir(), cache == "refresh"
    if cache is False or cache is None:
        return None, False
    if isinstance(cache, (str, os.PathLike)):
        return pathlib.Path(cache), False
    raise TypeError(f"cache must be True, False, 'refresh' or a directory, got {cache!r}")


def _parameters(function: Callable) -> Optional[int]:
    """How many positional arguments ``function`` takes at most (None: any number, or unknown)."""
    target = function.forward if isinstance(function, nn.Module) else function
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    positional = [p for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()):
        return None
    required = [p for p in positional if p.default is p.empty]
    return len(positional) if len(required) <= 2 else -len(required)


def _check_loss(name: str, function: Any, call: str) -> None:
    if function is None:
        return
    if isinstance(function, type):
        fix = f"{function.__name__}()" if issubclass(function, nn.Module) else f"{function.__name__}(...)"
        raise TypeError(f"{name} is the class {function.__name__}, not a function; pass an instance: {name}={fix}")
    if not callable(function):
        raise TypeError(f"{name} must be callable as {call}, got {type(function).__name__}")
    count = _parameters(function)
    if count is not None and count < 2:
        raise TypeError(f"{name} is called as {call} with two arguments, but {getattr(function, '__name__', name)} "
                        f"takes {abs(count)}; give it the signature {call}")


def _check_model_and_optimizer(model: Any, optimizer: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, p in trainable if id(p) not in stepped]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no parameter that requires grad, so a step has nothing to train; "
                         "unfreeze the parameters to train (p.requires_grad_(True)) before wrapping it")
    if len(missing) == len(trainable):
        raise ValueError("the optimizer holds none of the model's parameters, so training would change nothing "
                         "but BatchNorm's running statistics; build it from this model: "
                         "optimizer = torch.optim.SGD(model.parameters(), ...)")
    if missing:
        listing = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        log.warning("%d of the model's parameters that require grad are in no optimizer param group (%s): they "
                    "get gradients but are never updated; freeze them (requires_grad_(False)) or add them to "
                    "the optimizer", len(missing), listing)


def _bn_code(mode: BatchNormMode) -> float:
    two_pass = mode if isinstance(mode, TwoPass) else mode.two_pass if isinstance(mode, Auto) else TwoPass()
    formats = [i for i, allowed in enumerate(PHASE1_FORMATS) if two_pass.phase1_memory_format is allowed]
    precise = {False: 0, True: 1, None: 2}[two_pass.precise]
    return BN_MODES.index(mode.name) * 100 + 10 * precise + formats[0]


def _bn_key(mode: BatchNormMode) -> str:
    """The mode in the cache's key: a precise two_pass keeps other tensors, so it plans apart."""
    two_pass = mode if isinstance(mode, TwoPass) else mode.two_pass if isinstance(mode, Auto) else None
    return mode.name + ("" if two_pass is None or two_pass.precise is False else f" precise={two_pass.precise}")


@dataclass(frozen=True)
class Options:
    """Everything ``wrap`` was told, checked. Build it with `build`."""

    target_batch: int = field(metadata={"agreed": int, "keyed": str})
    loss_fn: Optional[Callable] = None
    compute_loss: Optional[Callable] = field(default=None, metadata={"keyed": lambda f: str(f is not None)})
    micro_batch: MicroBatch = field(default="auto", metadata={"agreed": lambda m: 0 if m == "auto" else m})
    bn: BatchNormMode = field(default_factory=lambda: settled(Auto()), metadata={"agreed": _bn_code, "keyed": _bn_key})
    scaler: Optional[Any] = None
    autocast_dtype: Optional[torch.dtype] = field(default=None, metadata={"keyed": str})
    max_grad_norm: Optional[float] = None
    before_step: Optional[Callable] = None
    device: Optional[torch.device] = None
    memory_budget: Union[int, float, str, None] = field(default=None, metadata={"keyed": str})
    #: The plan cache's directory (None: no cache), and whether to measure afresh.
    cache: Optional[pathlib.Path] = None
    refresh_cache: bool = False
    grow_after: Optional[int] = None
    update_copies: UpdateCopies = field(default="device", metadata={"keyed": str})
    batches: BatchFormat = field(default_factory=batch_format)

    @property
    def auto(self) -> bool:
        return self.micro_batch == "auto"

    def agreed(self) -> dict[str, float]:
        """What every rank must share, by name, as numbers."""
        return {f.name: float(f.metadata["agreed"](getattr(self, f.name))) for f in fields(self)
                if "agreed" in f.metadata}

    def keyed(self) -> dict[str, str]:
        """What of the options changes a step's memory, for the plan cache's key."""
        return {f.name: f.metadata["keyed"](getattr(self, f.name)) for f in fields(self) if "keyed" in f.metadata}

    @classmethod
    def build(cls, model: nn.Module, optimizer: torch.optim.Optimizer, target_batch: int, world_size: int = 1, *,
              loss_fn: Optional[Callable] = None, compute_loss: Optional[Callable] = None,
              micro_batch: MicroBatch = "auto", bn: Union[str, BatchNormMode] = "auto",
              scaler: Optional[Any] = None, autocast_dtype: Optional[torch.dtype] = None,
              max_grad_norm: Optional[float] = None, before_step: Optional[Callable] = None,
              device: Union[torch.device, str, None] = None, memory_budget: Union[int, float, str, None] = None,
              cache: Union[bool, str, os.PathLike] = True, grow_after: Optional[int] = None,
              update_copies: UpdateCopies = "device", num_samples: Optional[Callable] = None,
              split_batch: Optional[Callable] = None, **deprecated: Any) -> "Options":
        """Check every argument of ``wrap`` and return them as one object; raises before anything changes."""
        _check_model_and_optimizer(model, optimizer)
        refresh = bool(deprecated.get("retune"))
        bn = _deprecated(bn, deprecated)
        check_target_batch(target_batch)
        if target_batch % world_size:
            raise ValueError(f"target_batch={target_batch} is the logical batch over all {world_size} ranks and must "
                             f"divide evenly among them; use a multiple of {world_size}")
        if (loss_fn is None) == (compute_loss is None):
            raise TypeError("give exactly one of loss_fn (called as loss_fn(model(inputs), targets)) and "
                            "compute_loss (called as compute_loss(model, micro_batch))")
        _check_loss("loss_fn", loss_fn, "loss_fn(outputs, targets)")
        _check_loss("compute_loss", compute_loss, "compute_loss(model, micro_batch)")
        if before_step is not None and not callable(before_step):
            raise TypeError(f"before_step must be callable, got {type(before_step).__name__}")
        if scaler is not None and not hasattr(scaler, "scale"):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
            raise TypeError(f"autocast_dtype must be a torch.dtype such as torch.bfloat16, got {autocast_dtype!r}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and not isinstance(
                max_grad_norm, bool) and max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
        if grow_after is not None and not (_is_int(grow_after) and grow_after >= 1):
            raise ValueError(f"grow_after must be a positive number of steps or None, got {grow_after!r}")
        if update_copies not in UPDATE_COPIES:
            raise ValueError(f"update_copies must be one of {UPDATE_COPIES}, got {update_copies!r}")
        micro_batch = check_micro_batch(micro_batch)
        check_memory_budget(memory_budget)
        mode = settled(bn_mode(bn), micro_batch)
        if micro_batch != "auto" and mode.plans_micro_batch:
            raise ValueError(f"bn={mode.name!r} plans its own micro-batch (the whole batch where it fits); leave "
                             f"micro_batch='auto', or use bn='two_pass' with micro_batch={micro_batch}")
        if memory_budget is not None and micro_batch != "auto":
            raise ValueError(f"memory_budget applies to micro_batch='auto'; with micro_batch={micro_batch} "
                             "drop memory_budget, or pass micro_batch='auto' to have the budget measured")
        directory, refreshed = _cache_setting(cache)
        return cls(target_batch, loss_fn, compute_loss, micro_batch, mode, scaler, autocast_dtype,
                   None if max_grad_norm is None else float(max_grad_norm), before_step,
                   None if device is None else torch.device(device), memory_budget, directory, refresh or refreshed, grow_after,
                   update_copies, batch_format(num_samples, split_batch))


#: Keywords of earlier versions, now settings of a mode or of the cache.
_MOVED = {"phase1_memory_format": "bn=autobatch.TwoPass(phase1_memory_format=...)",
          "retune": "cache='refresh'"}


def _deprecated(bn: Any, deprecated: dict[str, Any]) -> Any:
    """``bn`` with the moved keywords folded in; each moved keyword warns (DeprecationWarning)."""
    unknown = sorted(set(deprecated) - set(_MOVED))
    if "lockstep" in unknown:
        raise TypeError(LOCKSTEP_REMOVED)
    if unknown:
        raise TypeError(f"wrap() got an unexpected keyword argument {unknown[0]!r}")
    for name, value in deprecated.items():
        warnings.warn(f"wrap({name}=...) is deprecated; use {_MOVED[name]}", DeprecationWarning, stacklevel=4)
    if "phase1_memory_format" in deprecated:
        mode, layout = bn_mode(bn), deprecated["phase1_memory_format"]
        if isinstance(mode, TwoPass):
            bn = TwoPass(phase1_memory_format=layout, precise=mode.precise)
        elif isinstance(mode, Auto):
            bn = Auto(TwoPass(phase1_memory_format=layout, precise=None))
    return bn
