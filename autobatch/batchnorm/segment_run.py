"""A logical batch through the captured graph, cut before every training-mode BatchNorm: the exact backward.

two_pass's projected backward takes a BatchNorm's two backward means over one micro-batch; the full
batch takes them over the whole batch, and a layer's means must be known before anything below it
back-propagates. Going down the graph one segment at a time gives every layer those means::

    run = SegmentRun.start(graph, args, kwargs, rows=16, cut_layers=layers_in_training_mode)
    output = run.forward(seen, draws)                 # phase 1: the whole batch, boundaries kept
    part = run.output_rows(4, 4)                      # a micro-batch's loss on rows 4:8 of it...
    run.take_output_grads(4, 4)                       # ...and the gradient its backward left there
    run.backward(splits, layers, intercept, replay)   # segment by segment, the last one first; None, or why the
                                                      # recomputation does not repeat phase 1

In the backward each micro-batch's segment is recomputed from the tensors phase 1 kept at its
boundary, back-propagated to the BatchNorm's output, and the BatchNorm's own backward then runs
over the whole batch at once (autobatch.batchnorm.layer_backward): exactly the full batch's gradient,
at the cost of one more forward, as activation checkpointing costs. Memory: phase 1 keeps, for the
whole batch, what crosses from one group of segments to a later one (autobatch.batchnorm.segment_layout);
the backward holds one group's inner boundary, one segment of one micro-batch and the gradients at the
current cut.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
import torch.fx as fx
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from autobatch.batchnorm.capture import CapturedGraph, Unsupported
from autobatch.batchnorm.layer_backward import LayerBackward
from autobatch.batchnorm.rows import Rows, rows_per_sample
from autobatch.batchnorm.segment_layout import Segment, SegmentLayout
from autobatch.batchnorm.statistics import LayerStatistics, normalize
from autobatch.modes import Boundaries

__all__ = ["RECOMPUTE_TOLERANCE", "SegmentRun"]

#: How far a recomputed boundary tensor may lie from phase 1's, relative to its largest value:
#: convolutions pick other algorithms for other batch sizes (TF32 on GPUs), and half precision
#: rounds to 3 digits. A mask drawn afresh, or an operation that mixes samples, is off by order 1.
RECOMPUTE_TOLERANCE = {torch.float64: 1e-8, torch.float32: 2e-2}
RECOMPUTE_TOLERANCE_HALF = 0.1


def _add_grad(tensor: Optional[Tensor], grad: Tensor) -> None:
    if tensor is None or not tensor.requires_grad:
        return
    grad = grad.to(tensor.dtype)
    tensor.grad = grad if tensor.grad is None else tensor.grad + grad


class _Interpreter(fx.Interpreter):
    """torch.fx's Interpreter for running nodes one at a time, many times a step: each submodule and attribute
    looked up once per step (the model cannot change within one; autobatch.batchnorm.fingerprint captures it
    again between steps), and none of the per-node bookkeeping fx keeps for tracing."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self._attributes: dict[str, Any] = {}

    def fetch_attr(self, target: str) -> Any:
        if target not in self._attributes:
            self._attributes[target] = super().fetch_attr(target)
        return self._attributes[target]

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        return getattr(self, n.op)(n.target, args, kwargs)


class SegmentRun:
    """The captured graph run for one logical batch: phase 1's forward, each micro-batch's rows of its output,
    and the backward segment by segment (its order: the NOTE in `backward`).

    Segments run in groups (autobatch.batchnorm.segment_layout). Phase 1 keeps only what crosses from one
    group to a later one; the backward first recomputes a group's inner boundary tensors, micro-batch by
    micro-batch without gradients, then goes down its segments. That trades one more forward for keeping
    about twice the square root of the cuts instead of all."""

    def __init__(self, graph: CapturedGraph, inputs: dict[fx.Node, Any], rows: int, cut_layers: set[int],
                 boundaries: Boundaries = Boundaries.GROUPED):
        self.graph = graph
        self.rows = rows
        self._inputs = inputs

        def is_cut(node: fx.Node) -> bool:
            module = graph.batch_norm_module(node)
            return module is not None and id(module) in cut_layers

        self.layout = SegmentLayout(graph.nodes, graph.output, is_cut, None if boundaries is Boundaries.GROUPED else 1)
        #: Whole-batch values the backward reads: phase 1's (crossing groups, and the output's) and, while a
        #: group runs, its own boundary tensors recomputed.
        self._kept: dict[fx.Node, Any] = {}
        self._output: dict[fx.Node, Any] = {}
        self._grads: dict[fx.Node, Rows] = {}
        #: Phase 1's largest value of each boundary tensor checked (`_deviation`).
        self._scales: dict[fx.Node, Tensor] = {}
        #: BatchNorm backwards whose input gradient is still to be taken, by the node of their input.
        self._pending: dict[fx.Node, list[LayerBackward]] = {}
        self._leaves: list[tuple[fx.Node, Tensor]] = []
        #: The outputs each micro-batch computes itself (a loss inside forward), and what they read.
        self._tail: list[fx.Node] = []
        self._tail_inputs: list[fx.Node] = []
        self._tail_recomputed: list[fx.Node] = []
        #: Whether kept tensors move to host memory once phase 1 is done with them (`_offload`), and those moved.
        self._host = boundaries is Boundaries.HOST
        #: Whether the backward recomputes each segment for the whole batch at once (`chunks`).
        self._whole = boundaries is Boundaries.WHOLE_SEGMENTS
        self._on_host: set[fx.Node] = set()
        #: The device the graph runs on (phase 1's), where kept rows come back to.
        self._device: Optional[torch.device] = None
        #: Why phase 1 found the graph cannot run precise, raised at its end (`forward`).
        self._refusals: list[str] = []
        #: Bytes of each batched tensor phase 1 made, kept or not: what keeping other boundaries would hold.
        self._bytes: dict[fx.Node, int] = {}
        #: How many rows each sample holds in each batched tensor's first dimension (autobatch.batchnorm.rows: 1, or
        #: k for tokens or frames folded into it); None where the dimension is not the samples'.
        self._sample_rows: dict[fx.Node, Optional[int]] = {}
        self._interpreter = _Interpreter(graph.graph_module)

    @classmethod
    def start(cls, graph: CapturedGraph, args: tuple, kwargs: dict, rows: int,
              cut_layers: Sequence[_BatchNorm], boundaries: Boundaries = Boundaries.GROUPED) -> "SegmentRun":
        """One logical batch of ``rows`` samples through ``graph``, called as the module was; ``cut_layers``:
        the BatchNorm modules that normalize with batch statistics in this step; ``boundaries``: what phase 1
        keeps for the backward, as the plan chose (autobatch.modes.Boundaries)."""
        return cls(graph, graph.bind(args, kwargs), rows, {id(module) for module in cut_layers}, boundaries)

    # -- phase 1 ---------------------------------------------------------------------------------

    def forward(self, seen: list[Tensor], draws: Callable[[], int]) -> Any:
        """The whole batch through the graph (phase 1, under the caller's BatchNorm handler, which
        appends each training-mode call's input to ``seen``); ``draws()``: random draws so far."""
        env: dict[fx.Node, Any] = {}
        versions: dict[fx.Node, int] = {}
        order = self.layout.order
        last_use = {node: max((order[user] for user in node.users), default=-1) for node in self.graph.nodes}
        for index, group in enumerate(self.layout.groups):
            for segment in group:
                segment.draws = draws()
                for node in segment.nodes:
                    env[node] = self._phase1_node(node, env, seen, segment)
                    for arg in node.all_input_nodes:
                        if last_use[arg] == order[node] and self.layout.done_with(arg, index):
                            if self._host and arg in self._kept and arg.op != "placeholder":
                                self._offload(arg, env.pop(arg), versions[arg])
                            else:
                                env.pop(arg, None)  # dropped here: phase 1 holds no more than it needs
                versions.update((node, env[node]._version) for node in segment.nodes
                                if node in env and node in self.layout.tensors)
            self._keep(group, index, env)
        if self._refusals:  # found on the way: raised once phase 1 has met every other rank's statistics
            raise Unsupported(self._refusals[0])
        for node, value in list(self._kept.items()):
            if node.op == "placeholder" or node in self._on_host:
                continue
            if self._host and node not in self.layout.output_nodes:  # read across groups: held to the end
                self._offload(node, value, versions[node])
            else:
                self._check_unchanged(node, value, versions[node])
        self._output = {node: env[node] for node in self.layout.output_nodes}
        self._reductions(env)
        self.layout.connect(set(self._kept))
        return self.graph.output_of(fx.node.map_arg(self.graph.output.args[0], self._output.__getitem__))

    @staticmethod
    def _check_unchanged(node: fx.Node, value: Tensor, version: int) -> None:
        if value._version != version:
            raise Unsupported(f"an in-place operation after {node.format_node()}'s segment changes its value, "
                              "which the backward would apply twice")

    def _offload(self, node: fx.Node, value: Tensor, version: int) -> None:
        """A kept tensor phase 1 is done with, to host memory (pinned where it comes from a CUDA device, copied
        without waiting): the backward brings its rows back (`_rows`). Its scale for `_deviation` is taken now,
        on the device, so that nothing reads the host copy before the copy has landed."""
        self._check_unchanged(node, value, version)
        self._device = value.device
        self._scale(node, value)
        host = torch.empty_like(value, device="cpu", pin_memory=value.is_cuda)
        self._kept[node] = host.copy_(value, non_blocking=True)
        self._on_host.add(node)

    def _rows_each(self, node: fx.Node) -> int:
        """How many rows each sample holds in ``node``'s tensor (1 for a tensor of the samples)."""
        return self._sample_rows.get(node) or 1

    def _rows(self, node: fx.Node, start: int, stop: int) -> Tensor:
        """Samples ``start:stop`` of a kept tensor, on the device the graph runs on."""
        per_sample = self._rows_each(node)
        rows = self._kept[node][start * per_sample:stop * per_sample]
        return rows.to(self._device, non_blocking=True) if node in self._on_host else rows

    def _phase1_node(self, node: fx.Node, env: dict[fx.Node, Any], seen: list[Tensor], segment: Segment) -> Any:
        if node.op == "placeholder":
            value = self._inputs[node]
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == self.rows:
                self.layout.batched.add(node)
        else:
            calls = len(seen)
            value = self._run(node, env)
            if any(arg in self.layout.batched for arg in node.all_input_nodes):
                self.layout.batched.add(node)
                self._sample_rows[node] = self._rows_per_sample(value)
            made = len(seen) - calls
            if node is segment.norm:
                if made != 1 or seen[-1] is not env[node.args[0]] or len(node.args) != 1 or node.kwargs:
                    raise Unsupported(f"BatchNorm module {node.target!r} does not normalize its one input with one "
                                      "F.batch_norm call")
            elif made:
                raise Unsupported(f"{node.format_node()} makes a training-mode BatchNorm call inside another node")
        if isinstance(value, Tensor):
            self.layout.tensors.add(node)
            self._bytes[node] = value.numel() * value.element_size()
        return value

    def _reductions(self, env: dict[fx.Node, Any]) -> None:
        """The outputs that depend on the batch but are not per sample: a loss computed inside forward. Each
        micro-batch computes its own from its rows of the per-sample tensors phase 1 kept (the logits, the
        labels), as its forward would have (`output_rows`); so they must read kept tensors through
        operations without parameters, and nothing else."""
        self._tail = [node for node in self.layout.output_nodes
                      if node in self.layout.batched and self._rows_per_sample(self._output[node]) is None]
        if not self._tail:
            self._tail_inputs, self._tail_recomputed = [], []
            return
        kept = set(self._kept)
        self._tail_inputs, self._tail_recomputed = self.layout.wire(self._tail, kept)
        for node in self._tail_recomputed + self._tail:
            if node.op in ("call_module", "get_attr") or node.op == "placeholder":
                raise Unsupported(
                    f"the model's output {self._tail[0].format_node()} depends on the batch but does not hold its "
                    f"{self.rows} samples first, and reads {node.format_node()} besides the tensors the forward "
                    "returns (a loss computed inside forward?); return the logits too, or compute the loss "
                    "outside the model, in loss_fn or compute_loss")
        for node in self._tail_inputs:
            if node in self.layout.batched:
                self._check_per_sample(node, self._kept[node])
        # The layout cuts per-sample tensors only: the reductions are the micro-batches' own.
        self.layout.batched.difference_update(self._tail)

    def _rows_per_sample(self, value: Any) -> Optional[int]:
        return rows_per_sample(value.shape[0], self.rows) if isinstance(value, Tensor) and value.dim() > 0 else None

    def _check_per_sample(self, node: fx.Node, value: Any) -> None:
        """A tensor that depends on the batch and crosses a cut (or is an output) is cut into micro-batches by
        its first dimension: it must hold the batch's samples there."""
        if self._rows_per_sample(value) is not None:
            return
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        hint = ""
        if node in self.layout.output_nodes or any(user.op == "output" for user in node.users):
            hint = (" (a loss computed inside forward?); compute the loss outside the model, in loss_fn or "
                    "compute_loss")
        raise Unsupported(f"{node.format_node()} gives a value of shape {shape} that depends on the batch but does not "
                          f"hold its {self.rows} samples first{hint}")

    def _run(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        self._interpreter.env = env
        return self._interpreter.run_node(node)

    def _keep(self, group: list[Segment], index: int, env: dict[fx.Node, Any]) -> None:
        """At a group's end: keep what later groups read of it, drop the rest."""
        nodes = [node for segment in group for node in segment.nodes]
        later = self.layout.needed_later(nodes, self.layout.group_of.__getitem__)
        for node in nodes:
            if node not in env:
                continue
            value = env.pop(node)
            if node not in later:
                continue
            env[node] = value  # phase 1 goes on with it; the backward evaluates non-tensors again
            if node in self.layout.batched and node in self.layout.tensors:
                if node in self.layout.output_nodes and self._rows_per_sample(value) is None:
                    continue  # a reduction the forward returns (its loss): each micro-batch computes its own
                try:
                    self._check_per_sample(node, value)
                except Unsupported as refusal:  # this rank's batch alone may show it: phase 1 goes on to its end
                    self._refusals.append(str(refusal))
                    continue
                self._kept[node] = value
            elif node.op == "placeholder":
                self._kept[node] = value

    @property
    def kept_bytes(self) -> int:
        """Bytes of phase 1's values held until the backward."""
        seen: set[int] = set()
        total = 0
        for node, value in self._kept.items():
            if isinstance(value, Tensor) and id(value) not in seen and node not in self._on_host:
                seen.add(id(value))
                total += value.numel() * value.element_size()
        return total

    @property
    def every_boundary_bytes(self) -> int:
        """Bytes phase 1 would keep beyond the grouped layout's if it kept every segment's boundary (whichever
        layout ran): what the planner weighs against recomputing each group's inner boundary."""
        every, grouped = self.layout.kept_with(1), self.layout.kept_with(self.layout.grouped_size)
        return sum(self._bytes[node] for node in every - grouped)

    @property
    def whole_segment_bytes(self) -> int:
        """What recomputing whole segments adds (`Boundaries.WHOLE_SEGMENTS`): at most the largest segment's
        tensors for the whole batch, and their gradients while it goes back."""
        sizes = [sum(self._bytes.get(node, 0) for node in segment.nodes if node in self.layout.batched)
                 for segment in self.layout.segments]
        return 2 * max(sizes, default=0)

    # -- the micro-batches' losses ------------------------------------------------------------------

    def output_rows(self, start: int, rows: int) -> Any:
        """Rows ``start:start + rows`` of phase 1's output (the full batch's), as leaves whose
        gradients `take_output_grads` collects."""
        self._leaves = []
        reductions: dict[fx.Node, Any] = {}
        if self._tail:  # the micro-batch's own loss, from its rows of what the forward returns beside it
            env = self._rows_env(self._tail_inputs, self._tail_recomputed, start, start + rows, self._leaves)
            for node in self._tail:
                reductions[node] = env[node] = self._run(node, env)

        def rows_of(node: fx.Node) -> Any:
            if node in reductions:
                return reductions[node]
            value = self._output[node]
            if node not in self.layout.batched or not isinstance(value, Tensor):
                return value
            per_sample = self._rows_each(node)
            leaf = value[start * per_sample:(start + rows) * per_sample].detach()
            leaf.requires_grad_(value.is_floating_point())
            if leaf.requires_grad:
                self._leaves.append((node, leaf))
            return leaf

        return self.graph.output_of(fx.node.map_arg(self.graph.output.args[0], rows_of))

    def take_output_grads(self, start: int, rows: int) -> None:
        for node, leaf in self._leaves:
            if leaf.grad is not None:
                self._accumulate(node, start, start + rows, leaf.grad)
        self._leaves = []

    def _accumulate(self, node: fx.Node, start: int, stop: int, grad: Tensor) -> None:
        if node not in self._grads:
            self._grads[node] = Rows(self._kept[node], self._device, self._rows_each(node))
        self._grads[node].add(start, stop, grad)

    # -- the backward, segment by segment --------------------------------------------------------

    def backward(self, splits: list[int], layers: list[LayerStatistics],
                 intercept: Callable[[Callable], ContextManager[None]],
                 replay: Callable[[int, int, int], ContextManager[None]],
                 total: Optional[Callable[[Tensor], Tensor]] = None) -> Optional[str]:
        """Every parameter's gradient of the logical batch from the output's (``take_output_grads``),
        one segment at a time from the last, each micro-batch of ``splits`` recomputed. ``layers``: phase
        1's statistics, one per cut in order; ``intercept(handler)`` routes BatchNorm calls to a handler;
        ``replay(first_row, rows, draw)`` replays phase 1's random draws from number ``draw`` on; ``total``:
        with several processes, a sum over the ranks (a collective), for each layer's two backward sums.
        Returns why the step must be refused (a recomputed boundary tensor is not phase 1's), or None.

        NOTE [the order of the precise backward]
        1. Phase 1 (`forward`) ran the whole batch once, without gradients, and kept what crosses from one
           group of segments to a later one; each micro-batch's loss then took its rows of phase 1's output
           and its backward stopped there (`output_rows`, `take_output_grads`): nothing below the output
           has a gradient until the last micro-batch's backward has run. It runs this method.
        2. Groups from the last to the first. A group whose segments pass tensors to one another first has
           those recomputed for the whole batch, micro-batch by micro-batch, without gradients (`_refill`).
        3. In a group, segments from the last to the first. Each micro-batch's rows of the segment are
           recomputed from the kept boundary with gradients and back-propagated from what reached its
           outputs (`_segment_rows`); at the segment's first node, its BatchNorm, the output gradient of
           every micro-batch goes into one `LayerBackward`, which sums it over the whole batch.
        4. Once every micro-batch is in, the layer's two sums give its weight's and bias's gradients
           (`_finish_layer`), and the input gradient of any rows is computed when the segment below asks
           for them (`_grad_rows`): the full batch's gradient, layer by layer.
        5. Every recomputed boundary tensor is compared with phase 1's, with one device sync (`_failure`).

        A worked example: four segments [inputs, bn1), [bn1, bn2), [bn2, bn3), [bn3, output] in groups of 2,
        micro-batches of rows 0:4 and 4:8. Phase 1 keeps the inputs, bn2's input and the output. The
        backward refills group 2's inner boundary (bn3's input, rows 0:4 then 4:8); runs segment 3 for rows
        0:4 and 4:8 into bn3's LayerBackward, then takes bn3's sums; runs segment 2 the same way, whose
        output gradient is bn3's input gradient, into bn2's; then refills group 1 (bn1's input) and goes
        down segments 1 and 0 alike. Each parameter's gradient is then the whole batch's.
        """
        rows = self.chunks(splits)
        deviations: list[tuple[fx.Node, Tensor, float]] = []
        for index in reversed(range(len(self.layout.groups))):
            if self.layout.inner[index]:
                deviations += self._refill(index, rows, layers, intercept, replay)
            for segment in reversed(self.layout.groups[index]):
                layer_backward = None
                if segment.norm is not None:
                    module = self.graph.batch_norm_module(segment.norm)
                    source = segment.norm.args[0]
                    layer_backward = LayerBackward(self._kept[source], layers[segment.index - 1], module.weight,
                                                   lambda start, stop, source=source: self._rows(source, start, stop),
                                                   self._rows_each(source))
                if layer_backward is not None or any(node in self._grads or node in self._pending
                                                     for node in segment.outputs):
                    for start, stop in rows:
                        with replay(start, stop - start, segment.draws):
                            deviations += self._segment_rows(segment, start, stop, layer_backward, intercept)
                    if layer_backward is not None:
                        self._finish_layer(segment, layer_backward, total)
                for node in segment.nodes:
                    self._grads.pop(node, None)
                    self._pending.pop(node, None)
                    self._kept.pop(node, None)
        return self._failure(deviations)

    def chunks(self, splits: list[int]) -> list[tuple[int, int]]:
        """The rows each segment is recomputed in: the micro-batches of ``splits``, or all of them at once where
        the plan recomputes whole segments (fewer, larger recomputations: timm resnet50 in micro-batches of 4 of
        16 on the CPU took 1.27x plain accumulation's step so, 1.77x micro-batch by micro-batch)."""
        rows = [(sum(splits[:i]), sum(splits[:i + 1])) for i, n in enumerate(splits) if n]
        return [(rows[0][0], rows[-1][1])] if self._whole and rows else rows

    def _refill(self, index: int, rows: list[tuple[int, int]], layers: list[LayerStatistics],
                intercept: Callable[[Callable], ContextManager[None]],
                replay: Callable[[int, int, int], ContextManager[None]]) -> list[tuple[fx.Node, Tensor, float]]:
        """Group ``index``'s inner boundary tensors for the whole batch, recomputed micro-batch by
        micro-batch without gradients from what phase 1 kept at the group's start (with phase 1's
        statistics and random draws); what phase 1 kept of the group is checked against it."""
        group = self.layout.groups[index]
        inner, filled = self.layout.inner[index], {}
        nodes = [node for node in self.layout.group_nodes(index) if node.op != "placeholder"]
        # Up to the last inner boundary tensor: the group's last segment makes none (a prefix, so that phase 1's
        # random draws replay in their order).
        nodes = nodes[:max(nodes.index(node) for node in inner) + 1]
        inputs, recomputed = self.layout.wire(nodes, set(self._kept))
        statistics = {segment.norm: layers[segment.index - 1] for segment in group if segment.norm is not None}
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
                    per_sample = self._rows_each(node)
                    if node not in filled:
                        filled[node] = value.new_empty((self.rows * per_sample,) + tuple(value.shape[1:]))
                    filled[node][start * per_sample:stop * per_sample] = value
                deviations += [self._deviation(node, env[node], start, stop) for node in nodes
                               if node in self._kept and node in self.layout.batched and env[node].is_floating_point()]
        self._kept.update(filled)
        return deviations

    def _rows_env(self, inputs: list[fx.Node], recomputed: list[fx.Node], start: int, stop: int,
                  leaves: Optional[list[tuple[fx.Node, Tensor]]] = None) -> dict[fx.Node, Any]:
        """The values a recomputation of rows ``start:stop`` starts from: kept tensors sliced, the rest evaluated
        again. ``leaves``: where floating inputs become leaves whose gradients the backward collects."""
        env: dict[fx.Node, Any] = {}
        for node in inputs:
            value = self._kept[node]
            if node in self.layout.batched:
                value = self._rows(node, start, stop).detach()
                if leaves is not None and value.is_floating_point() and node.op != "placeholder":  # none for inputs
                    value = value.requires_grad_()
                    leaves.append((node, value))
                value = value.clone()  # in-place operations of the segment leave the leaf and phase 1's value alone
            env[node] = value
        for node in recomputed:
            env[node] = self._inputs[node] if node.op == "placeholder" else self._run(node, env)
        return env

    def _segment_rows(self, segment: Segment, start: int, stop: int, layer_backward: Optional[LayerBackward],
                      intercept: Callable[[Callable], ContextManager[None]]) -> list[tuple[fx.Node, Tensor, float]]:
        """One micro-batch's part of a segment: recomputed from the kept boundary, back-propagated from
        the gradients of its outputs; the gradients reaching its inputs added to theirs."""
        leaves: list[tuple[fx.Node, Tensor]] = []
        env = self._rows_env(segment.inputs, segment.recomputed, start, stop, leaves)
        normalized: list[Tensor] = []

        def batch_norm(call: Any) -> Tensor:
            with torch.no_grad():
                output = normalize(call, layer_backward.layer)
            normalized.append(output.requires_grad_())
            return output.clone()

        with torch.enable_grad():
            for node in segment.nodes:
                if node.op == "placeholder":
                    continue  # an input, as above
                if node is segment.norm:
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
        if layer_backward is not None:
            layer_backward.add(start, stop, normalized[0].grad if normalized else None)
        return [self._deviation(node, env[node], start, stop) for node in segment.outputs
                if isinstance(env[node], Tensor) and env[node].is_floating_point()]

    def _finish_layer(self, segment: Segment, layer_backward: LayerBackward,
                      total: Optional[Callable[[Tensor], Tensor]]) -> None:
        """The segment's BatchNorm backward over the whole batch: its weight's and bias's gradients now; its
        input's, rows at a time, when the segment that made the input asks for them (`_grad_rows`),
        so that the whole batch's input gradient is never held beside the output's. ``total``: the two sums
        over every rank's rows first."""
        if total is not None:
            layer_backward.over_ranks(total)
        module = self.graph.batch_norm_module(segment.norm)
        source = segment.norm.args[0]
        if source in self.layout.batched and source.op != "placeholder":
            self._pending.setdefault(source, []).append(layer_backward)
        weight_grad, bias_grad = layer_backward.parameter_grads()
        _add_grad(module.weight, weight_grad)
        _add_grad(module.bias, bias_grad)

    def _grad_rows(self, node: fx.Node, start: int, stop: int) -> Tensor:
        """The gradient at ``node``'s rows ``start:stop``: what later segments added, and the input
        gradients of the BatchNorm layers that read it."""
        grads = [self._grads[node].of(start, stop)] if node in self._grads else []
        grads += [pending.input_grad(start, stop) for pending in self._pending.get(node, ())]
        total = grads[0]
        for grad in grads[1:]:
            total = total + grad
        return total

    def _deviation(self, node: fx.Node, value: Tensor, start: int, stop: int) -> tuple[fx.Node, Tensor, float]:
        """How far a recomputed boundary tensor's rows lie from phase 1's: the largest difference, divided in
        `_failure` by phase 1's largest value of the whole batch (taken once per tensor)."""
        kept = self._rows(node, start, stop)
        tolerance = RECOMPUTE_TOLERANCE.get(kept.dtype, RECOMPUTE_TOLERANCE_HALF)
        self._scale(node, self._kept[node])
        with torch.no_grad():
            if value.shape != kept.shape:  # a value of the whole batch's (a reduction) taken for samples'
                return node, torch.full((), math.inf, device=kept.device), tolerance
            if not kept.numel():
                return node, torch.zeros((), device=kept.device), tolerance
            return node, (value.detach() - kept).abs_().amax(), tolerance

    def _scale(self, node: fx.Node, whole: Tensor) -> Tensor:
        """Phase 1's largest value of a kept tensor (taken once)."""
        if node not in self._scales:
            self._scales[node] = whole.detach().abs().amax().float().clamp_min(torch.finfo(torch.float32).tiny)
        return self._scales[node]

    def _failure(self, deviations: list[tuple[fx.Node, Tensor, float]]) -> Optional[str]:
        """One device sync for the whole backward: why the step is refused where a recomputed boundary tensor does
        not match phase 1's; None where every one does."""
        if not deviations:
            return None
        device = deviations[0][1].device
        differences = torch.stack([value.to(device, torch.float32) for _, value, _ in deviations])
        values = (differences / torch.stack([self._scales[node].to(device) for node, _, _ in deviations])).tolist()
        for (node, _, tolerance), value in zip(deviations, values):
            if not value <= tolerance:
                return (f"recomputing the micro-batches gave {node.format_node()} values {value:.3g} (relative) away "
                        f"from phase 1's for the same samples (rounding allows {tolerance}); TwoPass(precise=True) "
                        "needs the forward of a micro-batch to repeat the whole batch's for its samples. Likely "
                        "causes: a random operation autobatch does not replay, an operation that mixes the samples of "
                        "the batch, or one that changes a tensor phase 1 kept in place. No optimizer step was taken "
                        "and the model is unchanged; use bn='two_pass' (not precise) or bn='exact' for this model.")
        return None
