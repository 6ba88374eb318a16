import collections

import pytest
import torch
from torch import nn

import autobatch
from autobatch.split import CustomFormat, NestedFormat, balanced_splits, batch_format, split_batch

#: The default format: how wrap counts, cuts and moves a batch of tensors, lists and dicts.
NESTED = NestedFormat()
batch_size, take, non_finite_samples = NESTED.size, NESTED.take, NESTED.non_finite_samples
to_device = NESTED.to


def test_balanced_splits_example():
    assert balanced_splits(16, 7) == [6, 5, 5]
    assert balanced_splits(16, 16) == [16]
    assert balanced_splits(16, 100) == [16]
    assert balanced_splits(5, 1) == [1] * 5


@pytest.mark.parametrize("batch", range(1, 40))
@pytest.mark.parametrize("micro_batch", [1, 2, 3, 7, 8, 16])
def test_balanced_splits_properties(batch, micro_batch):
    splits = balanced_splits(batch, micro_batch)
    assert sum(splits) == batch
    assert max(splits) <= micro_batch
    assert max(splits) - min(splits) <= 1
    assert len(splits) == -(-batch // micro_batch)  # the fewest that fit


@pytest.mark.parametrize("batch, micro_batch", [(0, 4), (-1, 4), (4, 0)])
def test_balanced_splits_rejects(batch, micro_batch):
    with pytest.raises(ValueError):
        balanced_splits(batch, micro_batch)


Pair = collections.namedtuple("Pair", "image mask")


def nested(n=6):
    return {"pair": Pair(torch.randn(n, 3), torch.zeros(n, 2, 2)), "ids": [torch.arange(n)],
            "name": "batch", "scale": 0.5}


def test_batch_size_nested():
    assert batch_size(nested()) == 6
    assert batch_size((torch.ones(4, 2), None)) == 4


def test_batch_size_disagreement_names_the_tensors():
    batch = {"image": torch.ones(4, 3), "mask": [torch.ones(5)]}
    with pytest.raises(ValueError, match=r"batch\['image'\] has 4 .*batch\['mask'\]\[0\] has 5"):
        batch_size(batch)


def test_a_disagreement_over_long_lists_is_a_short_message():
    # A detection batch whose targets miss one image: the message names two paths, never the lists.
    images = [torch.randn(3, 20 + i, 30) for i in range(64)]
    targets = [{"boxes": torch.rand(2, 4), "labels": torch.ones(2, dtype=torch.long)} for _ in range(63)]
    with pytest.raises(ValueError) as caught:
        batch_size((images, targets))
    message = str(caught.value)
    assert "batch[1] has 63 (a list of samples)" in message and "batch[0] has 64 (a list of samples)" in message
    assert len(message) <= 230, len(message)


def detection_batch(n, same_size=False):
    images = [torch.randn(3, 16 if same_size else 12 + 2 * i, 16) for i in range(n)]
    targets = [{"boxes": torch.rand(i % 3 + 1, 4), "labels": torch.ones(i % 3 + 1, dtype=torch.long)}
               for i in range(n)]
    return images, targets


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("same_size", [False, True])
def test_torchvision_detection_batches_are_lists_of_samples(n, same_size):
    # Three 3-channel images of one size read as three samples too: the targets beside them are a list of dicts.
    batch = detection_batch(n, same_size)
    assert batch_size(batch) == n
    sizes = balanced_splits(n, 2)
    parts = split_batch(batch, sizes)
    assert [len(images) for images, _ in parts] == sizes
    assert [len(targets) for _, targets in parts] == sizes
    rejoined = [image for images, _ in parts for image in images]
    assert all(a is b for a, b in zip(rejoined, batch[0]))  # the samples themselves, whole and in order
    assert all(isinstance(images, list) and isinstance(targets, list) for images, targets in parts)


def test_default_collate_lists_are_batched_tensors():
    # PyTorch's default collate turns (input, target) samples into [inputs, targets]: batched tensors.
    from torch.utils.data import default_collate
    for n in (1, 2, 3, 5):
        batch = default_collate([(torch.randn(3, 8, 8), torch.randn(1, 8, 8)) for _ in range(n)])
        assert isinstance(batch, list) and batch_size(batch) == n
        parts = split_batch(batch, balanced_splits(n, 2))
        assert [p[0].shape[0] for p in parts] == balanced_splits(n, 2)
        assert torch.equal(torch.cat([p[1] for p in parts]), batch[1])


def test_lists_of_sequences_of_different_lengths_are_samples():
    sequences = [torch.arange(length) for length in (5, 3, 7, 2)]
    batch = {"tokens": sequences, "lengths": torch.tensor([5, 3, 7, 2])}
    assert batch_size(batch) == 4
    first, second = split_batch(batch, [3, 1])
    assert first["tokens"] == sequences[:3] and torch.equal(second["lengths"], torch.tensor([2]))


def test_take_repeats_samples_of_lists_and_tensors():
    images, targets = detection_batch(3)
    taken = take((images, targets, torch.arange(3)), 5)
    assert [image is images[i] for i, image in zip([0, 1, 2, 0, 1], taken[0])] == [True] * 5
    assert taken[1][3] is targets[0] and taken[2].tolist() == [0, 1, 2, 0, 1]
    assert take((images, targets), 2)[1] == targets[:2]


def test_non_finite_samples_of_a_list_of_samples():
    images, targets = detection_batch(4)
    images[2] = images[2].clone()
    images[2][0, 0, 0] = float("nan")
    targets[3]["boxes"] = targets[3]["boxes"] * float("inf")
    assert non_finite_samples((images, targets)) == [2, 3]


class Graphs:
    """A batch type of the user's own: graphs' nodes concatenated, each graph's size and target."""

    def __init__(self, nodes, sizes, targets=None):
        self.nodes, self.sizes = nodes, list(sizes)
        self.targets = targets if targets is not None else torch.zeros(len(self.sizes), dtype=nodes.dtype)

    def split(self, counts):
        parts, node, graph = [], 0, 0
        for count in counts:
            width = sum(self.sizes[graph:graph + count])
            parts.append(Graphs(self.nodes[node:node + width], self.sizes[graph:graph + count],
                                self.targets[graph:graph + count]))
            node, graph = node + width, graph + count
        return parts

    def to(self, device):
        return Graphs(self.nodes.to(device), self.sizes, self.targets.to(device))


class GraphRegressor(torch.nn.Module):
    """Per-node features, summed per graph, one number per graph."""

    def __init__(self):
        super().__init__()
        self.node = torch.nn.Linear(3, 8)
        self.graph = torch.nn.Linear(8, 1)

    def forward(self, batch):
        index = torch.repeat_interleave(torch.arange(len(batch.sizes)), torch.tensor(batch.sizes))
        pooled = torch.zeros(len(batch.sizes), 8, dtype=batch.nodes.dtype).index_add_(
            0, index, torch.tanh(self.node(batch.nodes)))
        return self.graph(pooled).squeeze(1)


def test_a_batch_of_a_custom_class_trains_as_the_whole_batch():
    import copy

    import autobatch
    generator = torch.Generator().manual_seed(0)
    sizes = [3, 1, 4, 2, 5, 2, 3]
    batch = Graphs(torch.randn(sum(sizes), 3, generator=generator, dtype=torch.float64), sizes,
                   torch.randn(len(sizes), generator=generator, dtype=torch.float64))
    torch.manual_seed(0)
    model = GraphRegressor().double()
    reference = copy.deepcopy(model)
    loss = lambda model, graphs: torch.nn.functional.mse_loss(model(graphs), graphs.targets)  # noqa: E731
    loss(reference, batch).backward()
    grads = []
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 7, compute_loss=loss, micro_batch=3,
                        num_samples=lambda graphs: len(graphs.sizes), split_batch=lambda graphs, n: graphs.split(n),
                        before_step=lambda ab: grads.append([p.grad.clone() for p in ab.model.parameters()]))
    assert ab.step(batch) == pytest.approx(loss(reference, batch).item(), rel=1e-12)
    assert ab.plan.splits == [3, 2, 2]
    for got, p in zip(grads[0], reference.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-12)


def test_a_custom_format_counts_and_splits_with_the_users_functions():
    batch = Graphs(torch.randn(10, 3), [3, 1, 4, 2])
    fmt = batch_format(num_samples=lambda g: len(g.sizes), split_batch=lambda g, sizes: g.split(sizes))
    assert isinstance(fmt, CustomFormat) and fmt.size(batch) == 4
    parts = fmt.split(batch, [2, 2])
    assert [p.sizes for p in parts] == [[3, 1], [4, 2]]
    assert fmt.take(batch, 1).sizes == [3]
    assert {id(t) for t in fmt.tensors(batch)} == {id(batch.nodes), id(batch.targets)}
    with pytest.raises(ValueError, match="cannot repeat samples"):
        fmt.take(batch, 5)
    wrong = batch_format(num_samples=lambda g: len(g.sizes), split_batch=lambda g, sizes: [g])
    with pytest.raises(ValueError, match="one batch per size"):
        wrong.split(batch, [2, 2])


@pytest.mark.parametrize("options, message", [
    ({"num_samples": len}, "together"),
    ({"num_samples": 3, "split_batch": lambda b, s: b}, "callable"),
])
def test_a_custom_format_needs_both_functions(options, message):
    with pytest.raises(TypeError, match=message):
        batch_format(**options)


@pytest.mark.parametrize("batch, message", [
    (torch.ones(0, 3), "empty"),
    ({"a": 1, "b": "x"}, "no tensor"),
    ((torch.ones(3), torch.tensor(1.0)), "0-dim"),
])
def test_batch_size_rejects(batch, message):
    with pytest.raises(ValueError, match=message):
        batch_size(batch)


def test_split_batch_keeps_structure_and_order():
    batch = nested(7)
    parts = split_batch(batch, [3, 2, 2])
    assert [batch_size(p) for p in parts] == [3, 2, 2]
    for part in parts:
        assert isinstance(part["pair"], Pair) and isinstance(part["ids"], list)
        assert part["name"] == "batch" and part["scale"] == 0.5
    joined = torch.cat([p["pair"].image for p in parts])
    assert torch.equal(joined, batch["pair"].image)
    assert torch.equal(torch.cat([p["ids"][0] for p in parts]), torch.arange(7))
    assert parts[1]["pair"].image.data_ptr() == batch["pair"].image[3].data_ptr()  # views, no copies


def test_to_device_keeps_tensors_in_place_on_their_device():
    batch = nested()
    moved = to_device(batch, torch.device("cpu"))
    assert moved["pair"].image is batch["pair"].image
    assert moved["name"] == "batch"


def test_a_list_mixing_dicts_and_tensors_is_refused_with_what_to_do():
    batch = [{"image": torch.randn(3, 4, 4)} for _ in range(7)] + [torch.randn(3, 4, 4)]
    with pytest.raises(ValueError, match=r"batch mixes 7 dicts with 1 other items \(Tensor\)"):
        batch_size(batch)
    model = nn.Linear(4, 2)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, cache=False,
                        compute_loss=lambda model, batch: model(torch.stack([b["image"] for b in batch])).sum())
    with pytest.raises(ValueError, match="a list of samples holds samples of one kind"):
        ab.step(batch)
