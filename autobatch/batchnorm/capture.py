"""The model's forward captured as a graph whose BatchNorm modules are single nodes, to cut at.

    graph = CapturedGraph.trace(module)          # torch.fx; `Unsupported` where it cannot be had
    inputs = graph.bind(args, kwargs)            # the call's arguments, per placeholder node
    graph.batch_norm_module(node)                # the BatchNorm a node calls; None for any other node

What is done with the graph lives beside it: where it is cut (autobatch.batchnorm.segment_layout) and
how a logical batch runs through it (autobatch.batchnorm.segment_run).
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["CapturedGraph", "Unsupported"]


class Unsupported(RuntimeError):
    """The model cannot run segment by segment; the message says why."""


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every BatchNorm module a leaf: its call is one node, one cut."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, module_qualified_name)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


class CapturedGraph:
    """``module``'s forward as a torch.fx graph whose nodes call the module's own submodules."""

    def __init__(self, module: nn.Module, graph: fx.Graph):
        self.module = module
        self.graph_module = fx.GraphModule(module, graph)
        self.nodes = list(graph.nodes)
        self.placeholders = [node for node in self.nodes if node.op == "placeholder"]
        self.output = next(node for node in self.nodes if node.op == "output")
        self.signature = inspect.signature(module.forward)

    @classmethod
    def trace(cls, module: nn.Module) -> "CapturedGraph":
        """The graph of ``module``'s forward; `Unsupported` where torch.fx cannot trace it. A ``torch.compile``d
        module is traced as the module it compiles: the segments then run eagerly, as the gradient needs."""
        module = getattr(module, "_orig_mod", module)
        try:
            graph = _Tracer().trace(module)
        except Exception as error:
            raise Unsupported(f"torch.fx cannot trace {type(module).__name__}'s forward "
                              f"({type(error).__name__}: {_first_line(error)})") from error
        for node in graph.nodes:
            if node.op == "placeholder" and node.target.startswith("*"):
                raise Unsupported(f"{type(module).__name__}'s forward takes {node.target}, which torch.fx cannot bind")
            if node.op == "call_function" and node.target in (torch.nn.functional.batch_norm, torch.batch_norm):
                raise Unsupported(f"{type(module).__name__}'s forward calls batch_norm as a function "
                                  f"({node.name}); only BatchNorm modules can be cut at")
        return cls(module, graph)

    def batch_norm_module(self, node: fx.Node) -> Optional[_BatchNorm]:
        if node.op != "call_module":
            return None
        module = self.graph_module.get_submodule(node.target)
        return module if isinstance(module, _BatchNorm) else None

    def bind(self, args: tuple, kwargs: dict) -> dict[fx.Node, Any]:
        """The value of each placeholder for a call of the module with ``args`` and ``kwargs``."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise Unsupported(f"the model was called with arguments its traced forward cannot take ({error})") \
                from error
        bound.apply_defaults()
        return {node: bound.arguments.get(node.target) for node in self.placeholders}
