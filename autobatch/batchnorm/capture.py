"""The model's forward captured as a graph whose BatchNorm modules are single nodes, to cut at.

    graph = CapturedGraph.trace(module)          # torch.fx, symbolically; `Unsupported` where it cannot be had
    graph = CapturedGraph.trace_with(module, args, kwargs)   # or with real inputs: branches on shapes resolved
    inputs = graph.bind(args, kwargs)            # the call's arguments, per placeholder node
    graph.batch_norm_module(node)                # the BatchNorm a node calls; None for any other node
    graph.matches(args, kwargs)                  # whether a call's per-sample shapes are those it was captured at

What is done with the graph lives beside it: where it is cut (autobatch.batchnorm.segment_layout) and
how a logical batch runs through it (autobatch.batchnorm.segment_run).
"""
from __future__ import annotations

import collections
import inspect
import math
import operator
from typing import Any, ContextManager, Iterator, Optional

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["CapturedGraph", "Unsupported"]


class Unsupported(RuntimeError):
    """The model cannot run segment by segment; the message says why."""


def _autocast_state() -> tuple:
    """Whether autocast is on, and in which dtype, for the host and CUDA."""
    try:
        return tuple((torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in ("cpu", "cuda"))
    except TypeError:  # torch before 2.4
        return (torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype(), torch.is_autocast_enabled(),
                torch.get_autocast_gpu_dtype())


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every BatchNorm module a leaf: its call is one node, one cut. A forward that turns
    autocast on or off itself is refused: a graph holds no context manager, and would run that part in the
    caller's precision."""

    def trace(self, root: Any, concrete_args: Optional[dict] = None) -> fx.Graph:
        self._autocast = _autocast_state()
        return super().trace(root, concrete_args)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: Optional[str] = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        if _autocast_state() != self._autocast:
            raise Unsupported("the forward turns torch.autocast on or off inside, which a captured graph cannot hold")
        return super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            self.path_of_module(m)
        except NameError:  # a module the forward makes as it runs (a loss, ``nn.CrossEntropyLoss()(...)``)
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


def _fx_patches_lifted() -> ContextManager[None]:
    """torch.fx's own way (private, in torch 2.2 and later) to call the real nn.Module while it traces."""
    lifted = getattr(torch.fx._symbolic_trace, "_maybe_revert_all_patches", None)
    if lifted is None:
        raise Unsupported(f"tracing on real inputs needs torch 2.2 or later (this is {torch.__version__})")
    return lifted()


#: What a tensor tells of itself without its values: a value computed from these alone (and constants) is the
#: same for every batch of the same per-sample shapes, dtypes and devices.
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "element_size", "get_device"})
_METADATA_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout", "is_floating_point"})
#: Those no batch changes (its size neither): read as real values, constants of the graph, so that the forward's
#: Python can hand them on (timm's EfficientViT: ``torch.autocast(device_type=v.device.type)``; ``dtype=x.dtype``).
_CONSTANT_ATTRIBUTES = frozenset({"dtype", "device", "is_cuda", "layout"})


class _ValueProxy(fx.Proxy):
    """A proxy whose node's real value the tracer knows: Python may read it where it is shape arithmetic."""

    def __getattr__(self, name: str) -> Any:
        if name in _CONSTANT_ATTRIBUTES:
            value = self.tracer.values.get(self.node)
            if isinstance(value, Tensor):
                return getattr(value, name)
        return super().__getattr__(name)

    def __len__(self) -> int:
        return len(self.tracer.concrete(self))

    def __int__(self) -> int:
        return int(self.tracer.concrete(self))

    def __index__(self) -> int:
        return operator.index(self.tracer.concrete(self))

    def __float__(self) -> float:
        return float(self.tracer.concrete(self))

    def __ceil__(self) -> int:
        return math.ceil(self.tracer.concrete(self))

    def __floor__(self) -> int:
        return math.floor(self.tracer.concrete(self))


class _ValueTracer(_Tracer):
    """torch.fx's tracer that also runs every node on real inputs, once: where the forward's Python reads a
    value (``if x.shape[1] != 3``, ``math.ceil(h / stride)``), it gets the real one, which the graph then
    holds as a constant. Only values computed from tensors' metadata (shapes, dtypes, devices) and
    constants may be read so: a branch on a tensor's values would hold for this batch alone, and is
    refused (`Unsupported`)."""

    def __init__(self, inputs: dict[str, Any]):
        super().__init__()
        self._inputs = inputs
        self.values: dict[fx.Node, Any] = {}
        #: Nodes whose value comes from metadata and constants alone.
        self.metadata: set[fx.Node] = set()
        #: The forward's output, when it is a dict of a class of its own (a transformers ModelOutput): torch.fx
        #: records a plain dict, and the graph's output is built back into this class.
        self.output_type: Optional[type] = None
        self._depth = 0
        self._outer: Optional[type] = None

    def create_arg(self, a: Any) -> Any:
        if self._depth == 0:
            self._outer = type(a)
        self._depth += 1
        try:
            return super().create_arg(a)
        finally:
            self._depth -= 1

    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict, name: Optional[str] = None,
                    type_expr: Any = None) -> fx.Node:
        if kind == "output" and self._outer is not None and issubclass(self._outer, dict) and \
                self._outer not in (dict, collections.OrderedDict):
            self.output_type = self._outer
        return super().create_node(kind, target, args, kwargs, name, type_expr)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: Optional[str] = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        # The node's value, computed as PyTorch computes it: with torch.fx's patches of nn.Module lifted, so that a
        # leaf module runs on real tensors rather than being traced again.
        with _fx_patches_lifted():
            value = self._run(kind, target, args, kwargs)
        self.values[node] = value
        inputs = node.all_input_nodes
        if not isinstance(value, Tensor) and (
                (kind == "call_method" and target in _METADATA_METHODS)
                or (kind == "call_function" and target is getattr and args[1] in _METADATA_ATTRIBUTES)
                or (kind == "call_function" and inputs and all(arg in self.metadata for arg in inputs))):
            self.metadata.add(node)
        return proxy

    def _run(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self._inputs.get(_argument_name(target, self._inputs), args[0] if args else None)
        if kind == "get_attr":
            return operator.attrgetter(target)(self.root)
        args, kwargs = fx.node.map_aggregate((args, kwargs), self._value)
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        return self.root.get_submodule(target)(*args, **kwargs)  # call_module: a leaf

    def _value(self, arg: Any) -> Any:
        return self.values[arg.node] if isinstance(arg, fx.Proxy) else arg

    def concrete(self, proxy: fx.Proxy) -> Any:
        """``proxy``'s real value, where it comes from metadata alone; else `Unsupported`."""
        if proxy.node not in self.metadata:
            raise Unsupported(f"the forward's Python reads the value of {proxy.node.format_node()}, which depends "
                              "on the batch's values (data-dependent control flow)")
        return self.values[proxy.node]

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.concrete(obj))

    def iter(self, obj: fx.Proxy) -> Iterator:
        return iter(self.concrete(obj))


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
        #: Traced on real inputs: each argument's per-sample shape, dtype and device (None: traced symbolically).
        self.sample_shapes: Optional[dict[str, Any]] = None
        #: The class of the forward's dict output, where torch.fx recorded it as a plain dict.
        self.output_type: Optional[type] = None

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
        return cls._checked(module, graph)

    @classmethod
    def _checked(cls, module: nn.Module, graph: fx.Graph, starred: bool = False) -> "CapturedGraph":
        """The captured graph, where the segments can run it (however it was traced); ``starred``: the forward's
        ``*args`` and ``**kwargs`` were traced empty, as constants (on real inputs), so they bind."""
        for node in graph.nodes:
            if node.op == "placeholder" and node.target.startswith("*") and not starred:
                raise Unsupported(f"{type(module).__name__}'s forward takes {node.target}, which torch.fx cannot bind")
            if node.op == "call_function" and node.target in (torch.nn.functional.batch_norm, torch.batch_norm):
                raise Unsupported(f"{type(module).__name__}'s forward calls batch_norm as a function "
                                  f"({node.name}); only BatchNorm modules can be cut at")
        return cls(module, graph)

    @classmethod
    def trace_with(cls, module: nn.Module, args: tuple, kwargs: dict) -> "CapturedGraph":
        """The graph of ``module``'s forward, traced while it runs on ``args`` and ``kwargs`` (no gradients; the
        caller puts back BatchNorm buffers and the random state): the forward's Python may branch on shapes.
        Traced twice, on the first 2 and 3 samples: a graph that differs between them depends on the batch's
        size, which the micro-batches' recomputation changes, and is refused (`Unsupported`)."""
        module = getattr(module, "_orig_mod", module)
        signature = inspect.signature(module.forward)
        arguments = _arguments(signature, args, kwargs)
        filled = _filled_starred(signature, arguments)
        if filled:  # transformers' forwards take **kwargs, and are called without: those are traced
            raise Unsupported(f"{type(module).__name__}'s forward was called with values in its {filled}, which "
                              "torch.fx cannot bind")
        rows = _rows(arguments.values())
        if rows < 3:
            raise Unsupported(f"the model's forward traced on real inputs needs 3 samples or more (has {rows})")
        tracers = [cls._trace_rows(module, arguments, n) for n in (2, 3)]
        if _code(tracers[0]) != _code(tracers[1]):
            # A forward may set state on its first call (transformers' config.problem_type): once more on 2.
            tracers[0] = cls._trace_rows(module, arguments, 2)
        if _code(tracers[0]) != _code(tracers[1]):
            raise Unsupported(f"{type(module).__name__}'s forward traced on 2 and on 3 samples takes other steps: "
                              "they depend on the batch's size, or on state the forward itself changes")
        captured = cls._checked(module, tracers[1].graph, starred=True)
        captured.sample_shapes = _sample_shapes(arguments)
        captured.output_type = tracers[1].output_type
        return captured

    @staticmethod
    def _trace_rows(module: nn.Module, arguments: dict[str, Any], n: int) -> "_ValueTracer":
        inputs = {name: value[:n] if isinstance(value, Tensor) and value.dim() > 0 else value
                  for name, value in arguments.items()}
        concrete = {name: value for name, value in inputs.items() if not isinstance(value, Tensor)}
        tracer = _ValueTracer(inputs)
        try:
            with torch.no_grad():
                tracer.trace(module, concrete_args=concrete or None)
        except Unsupported:
            raise
        except Exception as error:
            raise Unsupported(f"torch.fx cannot trace {type(module).__name__}'s forward on real inputs "
                              f"({type(error).__name__}: {_first_line(error)})") from error
        return tracer

    def output_of(self, values: Any) -> Any:
        """The forward's output from the graph's (a plain dict built back into the forward's own class)."""
        return values if self.output_type is None else self.output_type(**values)

    def matches(self, args: tuple, kwargs: dict) -> bool:
        """Whether a call with ``args`` and ``kwargs`` has the per-sample shapes, dtypes and devices the graph was
        traced at (always, for a symbolic trace)."""
        if self.sample_shapes is None:
            return True
        try:
            arguments = _arguments(self.signature, args, kwargs)
        except Unsupported:
            return False
        return not _filled_starred(self.signature, arguments) and _sample_shapes(arguments) == self.sample_shapes

    def batch_norm_module(self, node: fx.Node) -> Optional[_BatchNorm]:
        if node.op != "call_module":
            return None
        module = self.graph_module.get_submodule(node.target)
        return module if isinstance(module, _BatchNorm) else None

    def bind(self, args: tuple, kwargs: dict) -> dict[fx.Node, Any]:
        """The value of each placeholder for a call of the module with ``args`` and ``kwargs``."""
        arguments = _arguments(self.signature, args, kwargs)
        return {node: arguments.get(_argument_name(node.target, arguments)) for node in self.placeholders}


def _arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments by name, defaults included (a flag left at its default is a constant of the graph, as
    one passed is); `Unsupported` where the forward cannot take them."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise Unsupported(f"the model was called with arguments its forward cannot take ({error})") from error
    bound.apply_defaults()
    return bound.arguments


def _argument_name(target: str, arguments: dict[str, Any]) -> str:
    """The argument a placeholder stands for: its own name, or the one torch.fx numbered where it made the
    argument a constant of the graph (``concrete_args``: ``double_1`` for ``double=True``, checked by the graph)."""
    if target.lstrip("*") in arguments:  # "**kwargs": the dict of the keyword arguments it collects (here empty)
        return target.lstrip("*")
    name, _, number = target.rpartition("_")
    return name if number.isdigit() and name in arguments else target


def _filled_starred(signature: inspect.Signature, arguments: dict[str, Any]) -> Optional[str]:
    """The forward's ``*args`` or ``**kwargs`` where a call put values in it (None: none did)."""
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) and arguments.get(parameter.name):
            return ("*" if parameter.kind is parameter.VAR_POSITIONAL else "**") + parameter.name
    return None


def _code(tracer: "_ValueTracer") -> str:
    return tracer.graph.python_code("self").src


def _rows(values: Any) -> int:
    """The samples of a call: the first dimension of its first batched tensor."""
    return next((value.shape[0] for value in values if isinstance(value, Tensor) and value.dim() > 0), 0)


def _sample_shapes(arguments: dict[str, Any]) -> dict[str, Any]:
    return {name: (tuple(value.shape[1:]), value.dtype, value.device) if isinstance(value, Tensor) else
            (type(value).__name__, value if isinstance(value, (bool, int, float, str, type(None))) else None)
            for name, value in arguments.items()}
