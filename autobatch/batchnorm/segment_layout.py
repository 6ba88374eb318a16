"""Where the precise backward cuts a captured graph, and what crosses each cut: no tensor, no model run.

    layout = SegmentLayout(graph.nodes, graph.output, is_cut=lambda node: node in training_batch_norms)
    layout.segments          # from one cut to the next: the first from the inputs, each other from a BatchNorm
    layout.groups            # consecutive segments, about sqrt(len(segments)) each (group=1: every boundary kept)
    ...                      # phase 1 (autobatch.batchnorm.segment_run) marks layout.batched and layout.tensors
    layout.connect(kept)     # then: each segment's inputs, recomputed nodes and outputs; each group's inner boundary

A segment reads the tensors of earlier segments through its ``inputs`` (kept by phase 1 for the whole
batch, sliced per micro-batch), evaluates ``recomputed`` nodes again (sizes of batched tensors,
functions of parameters alone), and passes gradients back through its ``outputs``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch.fx as fx

__all__ = ["Segment", "SegmentLayout"]


@dataclass
class Segment:
    """The nodes from one cut to the next (the first segment: from the inputs to the first cut)."""

    index: int
    nodes: list[fx.Node]
    #: The BatchNorm node it starts with; None for the first segment.
    norm: Optional[fx.Node]
    #: Random draws phase 1 made before the segment (their replay starts there).
    draws: int = 0
    #: Tensors of earlier segments it reads, kept by phase 1 and sliced per micro-batch.
    inputs: list[fx.Node] = field(default_factory=list)
    #: Earlier nodes evaluated again: sizes of batched tensors, functions of parameters alone.
    recomputed: list[fx.Node] = field(default_factory=list)
    #: Its own tensors that later segments or the output read: gradients come back through them.
    outputs: list[fx.Node] = field(default_factory=list)


class SegmentLayout:
    """A graph's nodes cut before every node ``is_cut`` names, the segments grouped by ``group`` (default:
    about the square root of their number)."""

    def __init__(self, nodes: list[fx.Node], output: fx.Node, is_cut: Callable[[fx.Node], bool],
                 group: Optional[int] = None):
        self.nodes = nodes
        self.segments: list[Segment] = [Segment(0, [], None)]
        for node in nodes:
            if node.op == "output":
                continue
            if is_cut(node):
                self.segments.append(Segment(len(self.segments), [], node))
            self.segments[-1].nodes.append(node)
        #: Segments per group where phase 1 keeps only what crosses groups: about the square root of their number.
        self.grouped_size = max(1, math.ceil(math.sqrt(len(self.segments))))
        size = group or self.grouped_size
        self.groups = [self.segments[i:i + size] for i in range(0, len(self.segments), size)]
        self.segment_of = {node: segment.index for segment in self.segments for node in segment.nodes}
        self.group_of = {node: g for g, group in enumerate(self.groups) for segment in group for node in segment.nodes}
        self.order = {node: i for i, node in enumerate(nodes)}
        self.output_nodes = set(output.all_input_nodes)
        #: What phase 1 finds: nodes whose value depends on the batch (a placeholder holding the batch's
        #: samples, or a node reading such a node), and nodes whose value is a tensor.
        self.batched: set[fx.Node] = set()
        self.tensors: set[fx.Node] = set()
        #: Per group, the boundary tensors inside it that its backward recomputes before going down it.
        self.inner: list[list[fx.Node]] = []

    def group_nodes(self, index: int) -> list[fx.Node]:
        return [node for segment in self.groups[index] for node in segment.nodes]

    def done_with(self, node: fx.Node, group: int) -> bool:
        """Whether phase 1 may drop ``node``'s value at its last use in ``group``: no later group reads it,
        through a size of it or otherwise."""
        return node.op != "placeholder" and node not in self.output_nodes and all(
            self.group_of.get(user) == group and (user in self.tensors or user not in self.batched)
            for user in node.users)

    def needed_later(self, nodes: list[fx.Node], position: Callable[[fx.Node], int]) -> set[fx.Node]:
        """Those of ``nodes`` (in graph order) that a node of a later ``position`` reads; a size read
        later counts as the batched tensor it comes from, evaluated again there, through any chain of values
        computed from sizes (timm's lambda layers read ``H * W`` of a tensor three segments back)."""
        later: set[fx.Node] = set()
        for node in reversed(nodes):  # a node's inputs come before it: what it adds to `later` is met afterwards
            if node in later or node in self.output_nodes or (node.op == "placeholder" and node.users) or any(
                    user.op == "output" or position(user) > position(node) for user in node.users):
                if node in self.batched and node not in self.tensors:
                    later.update(node.all_input_nodes)
                later.add(node)
        return later

    def kept_with(self, size: int) -> set[fx.Node]:
        """The batched tensors phase 1 would keep in groups of ``size`` segments (what a later group reads), once
        phase 1 has marked them: 1 keeps every boundary, `grouped_size` the fewest."""
        position = {node: segment.index // size for segment in self.segments for node in segment.nodes}
        nodes = [node for node in self.nodes if node in position]
        return {node for node in self.needed_later(nodes, position.__getitem__)
                if node in self.batched and node in self.tensors and node.op != "placeholder"}

    def wire(self, nodes: list[fx.Node], boundary: set[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
        """What ``nodes`` read from before them: boundary tensors (sliced per micro-batch), and nodes
        evaluated again (sizes of batched tensors, functions of parameters alone), in graph order."""
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
        return inputs, [node for node in self.nodes if node in recomputed]

    def connect(self, kept: set[fx.Node]) -> None:
        """After phase 1 kept ``kept`` (what crosses from one group to a later one): each group's inner
        boundary (what crosses between its own segments, recomputed before its backward), and each
        segment's inputs, recomputed nodes and outputs."""
        self.inner = []
        for index in range(len(self.groups)):
            nodes = self.group_nodes(index)
            inner = self.needed_later(nodes, self.segment_of.__getitem__)
            self.inner.append([node for node in nodes if node in inner and node not in kept
                               and node in self.batched and node in self.tensors])
        boundary = kept.union(*self.inner)
        for segment in self.segments:
            segment.inputs, segment.recomputed = self.wire(segment.nodes, boundary)
            segment.outputs = [node for node in segment.nodes if node in boundary and node in self.batched
                               and node.op != "placeholder"]
