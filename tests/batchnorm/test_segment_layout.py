"""The precise backward's layout (autobatch.batchnorm.segment_layout): cuts, groups and wiring, no model run."""
from torch import nn

from autobatch.batchnorm.capture import CapturedGraph
from autobatch.batchnorm.segment_layout import SegmentLayout
from tests.common import AreaLaterNet


class SkipNet(nn.Module):
    """Three BatchNorms; bn1's output is read again past bn2 (a skip connection)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (nn.Conv2d(3, 3, 1) for _ in range(3))
        self.bn1, self.bn2, self.bn3 = (nn.BatchNorm2d(3) for _ in range(3))

    def forward(self, x):
        b = self.bn1(self.conv1(x))
        d = self.bn2(self.conv2(b.relu())) + b
        return self.bn3(self.conv3(d)).mean()


def layout_of(module):
    graph = CapturedGraph.trace(module)
    layout = SegmentLayout(graph.nodes, graph.output, lambda node: graph.batch_norm_module(node) is not None)
    names = {node.name: node for node in graph.nodes}
    # What phase 1 would find: every node holds the batch's samples, as a tensor.
    layout.batched.update(node for node in graph.nodes if node.op != "output")
    layout.tensors.update(layout.batched)
    return layout, names


def test_segments_start_at_each_cut_and_group_by_the_square_root_of_their_number():
    layout, _ = layout_of(SkipNet())
    assert [[node.name for node in segment.nodes] for segment in layout.segments] == [
        ["x", "conv1"], ["bn1", "relu", "conv2"], ["bn2", "add", "conv3"], ["bn3", "mean"]]
    assert [segment.norm.name if segment.norm else None for segment in layout.segments] == [None, "bn1", "bn2", "bn3"]
    assert [[segment.index for segment in group] for group in layout.groups] == [[0, 1], [2, 3]]


def test_phase_1_keeps_what_crosses_groups_and_each_segment_reads_its_boundary():
    layout, n = layout_of(SkipNet())
    crossing = layout.needed_later(layout.group_nodes(0), layout.group_of.__getitem__)
    assert {node.name for node in crossing} == {"x", "bn1", "conv2"}  # the input, the skip, bn2's input
    assert all(layout.done_with(n[name], 0) for name in ("conv1", "relu"))
    assert not layout.done_with(n["bn1"], 0)  # the skip reads it in the next group
    layout.connect(set(crossing) | {n["mean"]})
    assert [[node.name for node in inner] for inner in layout.inner] == [["conv1"], ["conv3"]]
    assert [[node.name for node in segment.inputs] for segment in layout.segments] == [
        ["x"], ["conv1"], ["conv2", "bn1"], ["conv3"]]  # x: a placeholder, sliced per micro-batch too
    assert [[node.name for node in segment.outputs] for segment in layout.segments] == [
        ["conv1"], ["bn1", "conv2"], ["conv3"], ["mean"]]


def test_kept_with_one_segment_per_group_is_every_boundary_and_with_the_grouped_size_what_crosses_groups():
    layout, _ = layout_of(SkipNet())
    assert layout.grouped_size == 2
    assert {node.name for node in layout.kept_with(1)} == {"conv1", "bn1", "conv2", "conv3", "mean"}
    assert {node.name for node in layout.kept_with(2)} == {"bn1", "conv2", "mean"}  # the input x is kept either way


def test_a_product_of_sizes_read_a_group_later_keeps_the_tensor_it_comes_from():
    """The sizes' chain (getattr, getitem, mul) reached back to bn0's input, an inner boundary of the first group,
    which the last group's backward then read before anything had refilled it (KeyError on timm lambda_resnet26t)."""
    layout, n = layout_of(AreaLaterNet())
    sizes = {node for node in layout.batched
             if node.op == "call_function" and node.name.startswith(("getattr", "getitem", "mul"))}
    layout.tensors.difference_update(sizes)  # as phase 1 finds them: values of the batch, not tensors
    assert [[segment.index for segment in group] for group in layout.groups] == [[0, 1, 2], [3, 4]]
    kept = layout.kept_with(layout.grouped_size)
    assert n["bns_0"] in kept
    layout.connect(kept | {n["x"]})
    # What a segment reads is kept, or its own group's inner boundary (refilled before its backward).
    assert set(layout.segments[4].inputs) <= kept | {n["x"]} | set(layout.inner[1])
    assert n["mul"] in layout.segments[4].recomputed
