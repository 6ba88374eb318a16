"""Activation checkpointing applied to chosen submodules for the duration of a step, and the policies
the planner measures.

    policy = Checkpointing(("layer1.0", "layer1.1"))
    with policy.applied(model):               # those submodules' forwards run under torch.utils.checkpoint
        loss_fn(model(x), y).backward()       # model, names and state_dict untouched, before and after

Checkpointing a module keeps its inputs and recomputes its inside during backward
(``use_reentrant=False``: works with any inputs, keyword arguments and nested checkpoints). With
``selective``, the recomputation keeps the outputs of convolutions and matrix products and recomputes
only the cheap operations between them (normalization, activations).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from autobatch.forward import forwards_replaced

__all__ = ["Checkpointing", "candidates"]

#: Operations whose outputs selective checkpointing keeps: the expensive ones.
_SAVED = tuple(op for op in (getattr(torch.ops.aten, name, None) for name in (
    "convolution", "_convolution", "mm", "addmm", "bmm", "baddbmm", "matmul", "linear",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "mkldnn_convolution", "cudnn_convolution")) if op is not None)


@dataclass(frozen=True)
class Checkpointing:
    """Which submodules (qualified names) run under activation checkpointing; none by default."""

    modules: tuple[str, ...] = ()
    selective: bool = False
    #: How the planner named it, for its table: "none", "depth 2", ...
    label: str = "none"

    def __bool__(self) -> bool:
        return bool(self.modules)

    def applies_to(self, model: nn.Module) -> bool:
        """Whether ``model`` has every module the policy names (a cached plan may name others)."""
        submodules = dict(_plain(model).named_modules())
        return all(name in submodules for name in self.modules)

    def applied(self, model: nn.Module) -> ContextManager[None]:
        """The submodules' forwards checkpointed while the block runs; their own forwards back after."""
        submodules = dict(_plain(model).named_modules())
        return forwards_replaced((submodules[name], self._checkpointed(submodules[name].forward))
                                 for name in self.modules)

    def _checkpointed(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        context_fn = _selective_contexts if self.selective else None

        @functools.wraps(forward)
        def run(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            if context_fn is None:
                return checkpoint(forward, *args, use_reentrant=False, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

        return run


def _selective_contexts() -> tuple[Any, Any]:
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        return CheckpointPolicy.MUST_SAVE if op in _SAVED else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _plain(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's wrapper: module names are the model's own."""
    return getattr(model, "_orig_mod", model)


def _holds_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def candidates(model: nn.Module, max_depth: int = 4) -> list[Checkpointing]:
    """The policies the planner measures: none, then every module with parameters at depth 1, 2, ...
    (each depth one policy, and the same with a selective recomputation); for a compiled model, none.
    Modules without parameters (activations, pooling) are never checkpointed alone."""
    if hasattr(model, "_orig_mod"):
        # Compiled, a checkpointed BatchNorm failed in backward (its counter's in-place update): the
        # compiler's own rematerialization (torch._functorch.config.activation_memory_budget) is the way.
        return [Checkpointing()]
    levels: list[list[str]] = []
    frontier = [("", model)]
    for _ in range(max_depth):
        frontier = [(f"{prefix}.{name}" if prefix else name, child) for prefix, module in frontier
                    for name, child in module.named_children()]
        chosen = [name for name, child in frontier if _holds_parameters(child)]
        if not chosen:
            break
        if not levels or chosen != levels[-1]:
            levels.append(chosen)
    found = [Checkpointing()]
    for depth, names in enumerate(levels, start=1):
        found.append(Checkpointing(tuple(names), label=f"depth {depth}"))
        if len(names) > 1:  # one checkpointed module is the whole model again
            found.append(Checkpointing(tuple(names), selective=True, label=f"depth {depth}, selective"))
    return found
