import collections

import pytest
import torch

from autobatch.split import balanced_splits, batch_size, split_batch, to_device


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
    with pytest.raises(ValueError, match=r"batch\['image'\]: 4.*batch\['mask'\]\[0\]: 5"):
        batch_size(batch)


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
