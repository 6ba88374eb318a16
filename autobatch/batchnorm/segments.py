"""The model traced into a graph and cut before every training-mode BatchNorm: the exact backward.

two_pass's projected backward takes a BatchNorm's two backward means over one micro-batch; the full
batch takes them over the whole batch, and a layer's means must be known before anything below it
back-propagates. Going down the graph one segment at a time gives every layer those means::

    graph = SegmentedGraph.trace(module)              # torch.fx, BatchNorm modules kept whole
    run = graph.start(args, kwargs, rows=16, cuts=layers_in_training_mode)
    output = run.forward(seen)                        # phase 1: the whole batch, boundaries kept
    part = run.output_rows(4, 4)                      # a micro-batch's loss on rows 4:8 of it...
    run.take_output_grads(4, 4)                       # ...and the gradient its backward left there
    run.backward(splits, layers, batch_norm)          # segment by segment, the last one first

In the backward each micro-batch's segment is recomputed from the tensors phase 1 kept at its
boundary, back-propagated to the BatchNorm's output, and the BatchNorm's own backward then runs
over the whole batch at once (see `_LayerBackward`): exactly the full batch's gradient, at
the cost of one more forward, as activation checkpointing costs. Memory: phase 1 keeps, for the
whole batch, every tensor that crosses a cut (each BatchNorm's input and what skip connections carry
past it); the backward holds one segment of one micro-batch and the gradients at the current cut.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from autobatch.batchnorm.statistics import LayerStatistics, normalize

__all__ = ["SegmentedGraph", "StepGraph", "Unsupported"]

#: How far a recomputed boundary tensor may lie from phase 1's, relative to its largest value:
#: convolutions pick other algorithms for other batch sizes (TF32 on GPUs), and half precision
#: rounds to 3 digits. A mask drawn afresh, or an operation that mixes samples, is off by order 1.
RECOMPUTE_TOLERANCE = {torch.float64: 1e-8, torch.float32: 2e-2}
RECOMPUTE_TOLERANCE_HALF = 0.1


class Unsupported(RuntimeError):
    """The model cannot run segment by segment; the message says why."""


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every BatchNorm module a leaf: its call is one node, one cut."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, module_qualified_name)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


class SegmentedGraph:
    """``module``'s forward as a torch.fx graph whose nodes call the module's own submodules."""

    def __init__(self, module: nn.Module, graph: fx.Graph):
        self.module = module
        self.graph_module = fx.GraphModule(module, graph)
        self.nodes = list(graph.nodes)
        self.placeholders = [node for node in self.nodes if node.op == "placeholder"]
        self.output = next(node for node in self.nodes if node.op == "output")
        self.signature = inspect.signature(module.forward)

    @classmethod
    def trace(cls, module: nn.Module) -> "SegmentedGraph":
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

    def start(self, args: tuple, kwargs: dict, rows: int, cuts: Sequence[_BatchNorm]) -> "StepGraph":
        """One logical batch of ``rows`` samples through the graph, called as the module was; ``cuts``:
        the BatchNorm modules that normalize with batch statistics in this step."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise Unsupported(f"the model was called with arguments its traced forward cannot take ({error})") \
                from error
        bound.apply_defaults()
        values = {node: bound.arguments.get(node.target) for node in self.placeholders}
        return StepGraph(self, values, rows, {id(module) for module in cuts})


@dataclass
class _Segment:
    """The nodes from one cut to the next (the first segment: from the inputs to the first cut)."""

    index: int
    nodes: list[fx.Node]
    #: The BatchNorm node it starts with; None for the first segment.
    cut: Optional[fx.Node]
    #: Random draws phase 1 made before the segment (their replay starts there).
    draws: int = 0
    #: Tensors of earlier segments it reads, kept by phase 1 and sliced per micro-batch.
    inputs: list[fx.Node] = field(default_factory=list)
    #: Earlier nodes evaluated again: sizes of batched tensors, functions of parameters alone.
    recomputed: list[fx.Node] = field(default_factory=list)
    #: Its own tensors that later segments or the output read: gradients come back through them.
    outputs: list[fx.Node] = field(default_factory=list)


class _LayerBackward:
    """One BatchNorm's backward over the whole batch from every micro-batch's output gradient::

        dx = weight * invstd * (g - mean(g) - xhat * mean(g * xhat))     # means over the whole batch

    ``x`` is phase 1's input of the layer (whole batch) and ``layer`` its statistics."""

    def __init__(self, x: Tensor, layer: LayerStatistics, weight: Optional[Tensor]):
        self.x, self.layer, self.weight = x, layer, weight
        self.shape = (1, -1) + (1,) * (x.dim() - 2)
        self.dims = [0] + list(range(2, x.dim()))
        self.g = torch.zeros_like(x)
        self.sum_dy = torch.zeros_like(layer.mean)
        self.sum_dy_xmu = torch.zeros_like(layer.mean)

    def _centred(self, start: int, stop: int) -> Tensor:
        return self.x[start:stop].to(self.layer.mean.dtype) - self.layer.mean.view(self.shape)

    def add(self, start: int, stop: int, grad: Optional[Tensor]) -> None:
        if grad is None:
            return
        self.g[start:stop] = grad
        grad = grad.to(self.layer.mean.dtype)
        self.sum_dy += grad.sum(self.dims)
        self.sum_dy_xmu += (grad * self._centred(start, stop)).sum(self.dims)

    def input_grad(self, start: int, stop: int, sums: tuple[Tensor, Tensor]) -> Tensor:
        mean_dy, mean_dy_xmu = (total / self.layer.values_per_channel for total in sums)
        invstd = self.layer.invstd
        scale = invstd if self.weight is None else invstd * self.weight.detach().to(invstd.dtype)
        grad = (self.g[start:stop].to(invstd.dtype) - mean_dy.view(self.shape)
                - self._centred(start, stop) * (invstd.square() * mean_dy_xmu).view(self.shape))
        return (grad * scale.view(self.shape)).to(self.x.dtype)


def _add_grad(tensor: Optional[Tensor], grad: Tensor) -> None:
    if tensor is None or not tensor.requires_grad:
        return
    grad = grad.to(tensor.dtype)
    tensor.grad = grad if tensor.grad is None else tensor.grad + grad


class StepGraph:
    """The graph run for one logical batch: phase 1's forward, each micro-batch's rows of its output,
    and the backward segment by segment.

    Segments run in groups of about the square root of their number (``group``: how many). Phase 1
    keeps only what crosses from one group to a later one; the backward first recomputes a group's
    inner boundary tensors, micro-batch by micro-batch without gradients, then goes down its segments.
    That trades one more forward for keeping about twice the square root of the cuts instead of all."""

    def __init__(self, graph: SegmentedGraph, inputs: dict[fx.Node, Any], rows: int, cuts: set[int],
                 group: Optional[int] = None):
        self.graph = graph
        self.rows = rows
        self._inputs = inputs
        self._segments: list[_Segment] = [_Segment(0, [], None)]
        for node in graph.nodes:
            if node.op == "output":
                continue
            module = graph.batch_norm_module(node)
            if module is not None and id(module) in cuts:
                self._segments.append(_Segment(len(self._segments), [], node))
            self._segments[-1].nodes.append(node)
        size = group or max(1, math.ceil(math.sqrt(len(self._segments))))
        self._groups = [self._segments[i:i + size] for i in range(0, len(self._segments), size)]
        self._segment_of = {node: segment.index for segment in self._segments for node in segment.nodes}
        self._group_of = {node: g for g, group in enumerate(self._groups) for segment in group for node in segment.nodes}
        self._order = {node: i for i, node in enumerate(graph.nodes)}
        self._output_nodes = set(graph.output.all_input_nodes)
        #: Nodes whose value depends on the batch (a placeholder holding ``rows`` samples, or such a node's).
        self._batched: set[fx.Node] = set()
        self._tensors: set[fx.Node] = set()
        #: Whole-batch values the backward reads: phase 1's (crossing groups, and the output's) and, while a
        #: group runs, its own boundary tensors recomputed.
        self._kept: dict[fx.Node, Any] = {}
        #: Per group, the boundary tensors inside it that its backward recomputes before going down it.
        self._inner: list[list[fx.Node]] = []
        self._output: dict[fx.Node, Any] = {}
        self._grads: dict[fx.Node, Tensor] = {}
        #: BatchNorm backwards whose input gradient is still to be taken, by the node of their input.
        self._pending: dict[fx.Node, list[_LayerBackward]] = {}
        self._leaves: list[tuple[fx.Node, Tensor]] = []
        self._interpreter = fx.Interpreter(graph.graph_module)

    # -- phase 1 ---------------------------------------------------------------------------------

    def forward(self, seen: list[Tensor], draws: Callable[[], int]) -> Any:
        """The whole batch through the graph (phase 1, under the caller's BatchNorm handler, which
        appends each training-mode call's input to ``seen``); ``draws()``: random draws so far."""
        env: dict[fx.Node, Any] = {}
        versions: dict[fx.Node, int] = {}
        last_use = {node: max((self._order[user] for user in node.users), default=-1) for node in self.graph.nodes}
        for index, group in enumerate(self._groups):
            for segment in group:
                segment.draws = draws()
                for node in segment.nodes:
                    env[node] = self._phase1_node(node, env, seen, segment)
                    for arg in node.all_input_nodes:
                        if last_use[arg] == self._order[node] and self._done_with(arg, index):
                            env.pop(arg, None)
                versions.update((node, env[node]._version) for node in segment.nodes
                                if node in env and node in self._tensors)
            self._keep(group, index, env)
        for node, value in self._kept.items():
            if node.op != "placeholder" and value._version != versions[node]:
                raise Unsupported(f"an in-place operation after {node.format_node()}'s segment changes its value, "
                                  "which the backward would apply twice")
        self._output = {node: env[node] for node in self._output_nodes}
        kept = set(self._kept)
        for group in self._groups:
            nodes = [node for segment in group for node in segment.nodes]
            inner = self._needed_later(nodes, self._segment_of.__getitem__)
            self._inner.append([node for node in nodes if node in inner and node not in kept
                                and node in self._batched and node in self._tensors])
        boundary = kept.union(*self._inner)
        for segment in self._segments:
            segment.inputs, segment.recomputed = self._wire(segment.nodes, boundary)
            segment.outputs = [node for node in segment.nodes if node in boundary and node in self._batched
                               and node.op != "placeholder"]
        return fx.node.map_arg(self.graph.output.args[0], self._output.__getitem__)

    def _phase1_node(self, node: fx.Node, env: dict[fx.Node, Any], seen: list[Tensor], segment: _Segment) -> Any:
        if node.op == "placeholder":
            value = self._inputs[node]
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == self.rows:
                self._batched.add(node)
        else:
            calls = len(seen)
            value = self._run(node, env)
            if any(arg in self._batched for arg in node.all_input_nodes):
                self._batched.add(node)
            made = len(seen) - calls
            if node is segment.cut:
                if made != 1 or seen[-1] is not env[node.args[0]] or len(node.args) != 1 or node.kwargs:
                    raise Unsupported(f"BatchNorm module {node.target!r} does not normalize its one input with one "
                                      "F.batch_norm call")
            elif made:
                raise Unsupported(f"{node.format_node()} makes a training-mode BatchNorm call inside another node")
        if isinstance(value, Tensor):
            self._tensors.add(node)
        return value

    def _done_with(self, node: fx.Node, group: int) -> bool:
        """Whether phase 1 may drop ``node``'s value at its last use: no later group reads it, through a
        size of it or otherwise."""
        return node.op != "placeholder" and node not in self._output_nodes and all(
            self._group_of.get(user) == group and (user in self._tensors or user not in self._batched)
            for user in node.users)

    def _run(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        self._interpreter.env = env
        return self._interpreter.run_node(node)

    def _needed_later(self, nodes: list[fx.Node], position: Callable[[fx.Node], int]) -> set[fx.Node]:
        """Those of ``nodes`` (in graph order) that a node of a later ``position`` reads; a size read
        later counts as the batched tensor it comes from, evaluated again there."""
        later: set[fx.Node] = set()
        for node in reversed(nodes):
            if node in self._output_nodes or (node.op == "placeholder" and node.users) or any(
                    user.op == "output" or position(user) > position(node) for user in node.users):
                if node in self._batched and node not in self._tensors:
                    later.update(node.all_input_nodes)
                later.add(node)
        return later

    def _keep(self, group: list[_Segment], index: int, env: dict[fx.Node, Any]) -> None:
        """At a group's end: keep what later groups read of it, drop the rest."""
        nodes = [node for segment in group for node in segment.nodes]
        later = self._needed_later(nodes, self._group_of.__getitem__)
        for node in nodes:
            if node not in env:
                continue
            value = env.pop(node)
            if node not in later:
                continue
            env[node] = value  # phase 1 goes on with it; the backward evaluates non-tensors again
            if node in self._batched and node in self._tensors:
                if value.dim() == 0 or value.shape[0] != self.rows:
                    raise Unsupported(f"{node.format_node()} gives a tensor of shape {tuple(value.shape)} that "
                                      f"depends on the batch but does not hold its {self.rows} samples first")
                self._kept[node] = value
            elif node.op == "placeholder":
                self._kept[node] = value

    def _wire(self, nodes: list[fx.Node], boundary: set[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
        """What ``nodes`` read from before them: boundary tensors (sliced per micro-batch), and nodes
        evaluated again (sizes of batched tensors, functions of parameters alone)."""
        own = set(nodes)
        inputs: list[fx.Node] = []
        recomputed: set[fx.Node] = set()

        def need(node: fx.Node) -> None:
            if node in recomputed or node in inputs or (node in own and node.op != "placeholder"):
                return
            if node in boundary:
                inputs.append(node)
            else:
                recomputed.add(node)
                for arg in node.all_input_nodes:
                    need(arg)

        for node in nodes:
            for arg in node.all_input_nodes:
                need(arg)
        return inputs, [node for node in self.graph.nodes if node in recomputed]

    @property
    def kept_bytes(self) -> int:
        """Bytes of phase 1's values held until the backward."""
        seen: set[int] = set()
        total = 0
        for value in self._kept.values():
            if isinstance(value, Tensor) and id(value) not in seen:
                seen.add(id(value))
                total += value.numel() * value.element_size()
        return total

    # -- the micro-batches' losses ------------------------------------------------------------------

    def output_rows(self, start: int, rows: int) -> Any:
        """Rows ``start:start + rows`` of phase 1's output (the full batch's), as leaves whose
        gradients `take_output_grads` collects."""
        self._leaves = []

        def rows_of(node: fx.Node) -> Any:
            value = self._output[node]
            if node not in self._batched or not isinstance(value, Tensor):
                return value
            leaf = value[start:start + rows].detach().requires_grad_(value.is_floating_point())
            if leaf.requires_grad:
                self._leaves.append((node, leaf))
            return leaf

        return fx.node.map_arg(self.graph.output.args[0], rows_of)

    def take_output_grads(self, start: int, rows: int) -> None:
        for node, leaf in self._leaves:
            if leaf.grad is not None:
                self._accumulate(node, start, start + rows, leaf.grad)
        self._leaves = []

    def _accumulate(self, node: fx.Node, start: int, stop: int, grad: Tensor) -> None:
        buffer = self._grads.get(node)
        if buffer is None:
            buffer = self._grads[node] = torch.zeros_like(self._kept[node])
        buffer[start:stop] += grad.to(buffer.dtype)

    # -- the backward, segment by segment --------------------------------------------------------

    def backward(self, splits: list[int], layers: list[LayerStatistics],
                 intercept: Callable[[Callable], ContextManager[None]],
                 replay: Callable[[int, int, int], ContextManager[None]]) -> None:
        """Every parameter's gradient of the logical batch from the output's (``take_output_grads``),
        one segment at a time from the last, each micro-batch of ``splits`` recomputed. ``layers``: phase
        1's statistics, one per cut in order; ``intercept(handler)`` routes BatchNorm calls to a handler;
        ``replay(first_row, rows, draw)`` replays phase 1's random draws from number ``draw`` on."""
        rows = [(sum(splits[:i]), sum(splits[:i + 1])) for i, n in enumerate(splits) if n]
        deviations: list[tuple[fx.Node, Tensor, float]] = []
        for index in reversed(range(len(self._groups))):
            if self._inner[index]:
                deviations += self._refill(index, rows, layers, intercept, replay)
            for segment in reversed(self._groups[index]):
                cut = None
                if segment.cut is not None:
                    module = self.graph.batch_norm_module(segment.cut)
                    cut = _LayerBackward(self._kept[segment.cut.args[0]], layers[segment.index - 1], module.weight)
                if cut is not None or any(node in self._grads or node in self._pending for node in segment.outputs):
                    for start, stop in rows:
                        with replay(start, stop - start, segment.draws):
                            deviations += self._segment_rows(segment, start, stop, cut, intercept)
                    if cut is not None:
                        self._cut_backward(segment, cut)
                for node in segment.nodes:
                    self._grads.pop(node, None)
                    self._pending.pop(node, None)
                    self._kept.pop(node, None)
        self._check(deviations)

    def _refill(self, index: int, rows: list[tuple[int, int]], layers: list[LayerStatistics],
                intercept: Callable[[Callable], ContextManager[None]],
                replay: Callable[[int, int, int], ContextManager[None]]) -> list[tuple[fx.Node, Tensor, float]]:
        """Group ``index``'s inner boundary tensors for the whole batch, recomputed micro-batch by
        micro-batch without gradients from what phase 1 kept at the group's start (with phase 1's
        statistics and random draws); what phase 1 kept of the group is checked against it."""
        group = self._groups[index]
        nodes = [node for segment in group for node in segment.nodes if node.op != "placeholder"]
        inputs, recomputed = self._wire(nodes, set(self._kept))
        statistics = {segment.cut: layers[segment.index - 1] for segment in group if segment.cut is not None}
        inner, filled = self._inner[index], {}
        deviations = []
        for start, stop in rows:
            env = self._rows_env(inputs, recomputed, start, stop)
            running: list[LayerStatistics] = []

            def batch_norm(call: Any) -> Tensor:
                return normalize(call, running[-1])

            with torch.no_grad(), replay(start, stop - start, group[0].draws), intercept(batch_norm):
                for node in nodes:
                    if node in statistics:
                        running.append(statistics[node])
                    env[node] = self._run(node, env)
                for node in inner:
                    value = env[node]
                    if node not in filled:
                        filled[node] = value.new_empty((self.rows,) + tuple(value.shape[1:]))
                    filled[node][start:stop] = value
                deviations += [self._deviation(node, env[node], start, stop) for node in nodes
                               if node in self._kept and node in self._batched and env[node].is_floating_point()]
        self._kept.update(filled)
        return deviations

    def _rows_env(self, inputs: list[fx.Node], recomputed: list[fx.Node], start: int, stop: int,
                  leaves: Optional[list[tuple[fx.Node, Tensor]]] = None) -> dict[fx.Node, Any]:
        """The values a recomputation of rows ``start:stop`` starts from: kept tensors sliced, the rest evaluated
        again. ``leaves``: where floating inputs become leaves whose gradients the backward collects."""
        env: dict[fx.Node, Any] = {}
        for node in inputs:
            value = self._kept[node]
            if node in self._batched:
                value = value[start:stop].detach()
                if leaves is not None and value.is_floating_point() and node.op != "placeholder":  # none for inputs
                    value = value.requires_grad_()
                    leaves.append((node, value))
                value = value.clone()  # in-place operations of the segment leave the leaf and phase 1's value alone
            env[node] = value
        for node in recomputed:
            env[node] = self._inputs[node] if node.op == "placeholder" else self._run(node, env)
        return env

    def _segment_rows(self, segment: _Segment, start: int, stop: int, cut: Optional[_LayerBackward],
                      intercept: Callable[[Callable], ContextManager[None]]) -> list[tuple[fx.Node, Tensor, float]]:
        """One micro-batch's part of a segment: recomputed from the kept boundary, back-propagated from
        the gradients of its outputs; the gradients reaching its inputs added to theirs."""
        leaves: list[tuple[fx.Node, Tensor]] = []
        env = self._rows_env(segment.inputs, segment.recomputed, start, stop, leaves)
        normalized: list[Tensor] = []

        def batch_norm(call: Any) -> Tensor:
            with torch.no_grad():
                output = normalize(call, cut.layer)
            normalized.append(output.requires_grad_())
            return output.clone()

        with torch.enable_grad():
            for node in segment.nodes:
                if node.op == "placeholder":
                    continue  # an input, as above
                if node is segment.cut:
                    with intercept(batch_norm):
                        env[node] = self._run(node, env)
                else:
                    env[node] = self._run(node, env)
            pairs = [(env[node], self._grad_rows(node, start, stop)) for node in segment.outputs
                     if (node in self._grads or node in self._pending) and isinstance(env[node], Tensor)
                     and env[node].requires_grad]
            if pairs:
                torch.autograd.backward([value for value, _ in pairs], [grad for _, grad in pairs])
        for node, leaf in leaves:
            if leaf.grad is not None:
                self._accumulate(node, start, stop, leaf.grad)
        if cut is not None:
            cut.add(start, stop, normalized[0].grad if normalized else None)
        return [self._deviation(node, env[node], start, stop) for node in segment.outputs
                if isinstance(env[node], Tensor) and env[node].is_floating_point()]

    def _cut_backward(self, segment: _Segment, cut: _LayerBackward) -> None:
        """The cut's BatchNorm backward over the whole batch: its weight's and bias's gradients now; its
        input's, rows at a time, when the segment that made the input asks for them (`_grad_rows`),
        so that the whole batch's input gradient is never held beside ``g``."""
        module = self.graph.batch_norm_module(segment.cut)
        source = segment.cut.args[0]
        if source in self._batched and source.op != "placeholder":
            self._pending.setdefault(source, []).append(cut)
        _add_grad(module.weight, cut.sum_dy_xmu * cut.layer.invstd)
        _add_grad(module.bias, cut.sum_dy)

    def _grad_rows(self, node: fx.Node, start: int, stop: int) -> Tensor:
        """The gradient at ``node``'s rows ``start:stop``: what later segments added, and the input
        gradients of the BatchNorm layers that read it."""
        grads = [self._grads[node][start:stop]] if node in self._grads else []
        grads += [cut.input_grad(start, stop, (cut.sum_dy, cut.sum_dy_xmu)) for cut in self._pending.get(node, ())]
        total = grads[0]
        for grad in grads[1:]:
            total = total + grad
        return total

    def _deviation(self, node: fx.Node, value: Tensor, start: int, stop: int) -> tuple[fx.Node, Tensor, float]:
        kept = self._kept[node][start:stop]
        tolerance = RECOMPUTE_TOLERANCE.get(kept.dtype, RECOMPUTE_TOLERANCE_HALF)
        with torch.no_grad():
            scale = kept.abs().amax().float() if kept.numel() else torch.zeros((), device=kept.device)
            spread = (value.detach() - kept).abs().amax().float() if kept.numel() else scale
            return node, spread / scale.clamp_min(torch.finfo(torch.float32).tiny), tolerance

    def _check(self, deviations: list[tuple[fx.Node, Tensor, float]]) -> None:
        """One device sync for the whole backward: every recomputed boundary tensor matches phase 1's."""
        if not deviations:
            return
        values = torch.stack([value.to(deviations[0][1].device) for _, value, _ in deviations]).tolist()
        for (node, _, tolerance), value in zip(deviations, values):
            if not value <= tolerance:
                raise RuntimeError(
                    f"recomputing the micro-batches gave {node.format_node()} values {value:.3g} (relative) away from "
                    f"phase 1's for the same samples (rounding allows {tolerance}); TwoPass(precise=True) needs the "
                    "forward of a micro-batch to repeat the whole batch's for its samples. Likely causes: a random "
                    "operation autobatch does not replay, an operation that mixes the samples of the batch, or one "
                    "that changes a tensor phase 1 kept in place. No optimizer step was taken and the model is "
                    "unchanged; use bn='two_pass' (not precise) or bn='exact' for this model.")
