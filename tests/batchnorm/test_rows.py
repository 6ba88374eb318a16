"""Whole-batch tensors held as micro-batches' rows (autobatch.batchnorm.rows)."""
import torch

from autobatch.batchnorm.rows import Rows, rows_per_sample


def test_rows_per_sample():
    assert rows_per_sample(16, 16) == 1 and rows_per_sample(128, 8) == 16
    assert rows_per_sample(6, 8) is None and rows_per_sample(12, 8) is None and rows_per_sample(0, 8) is None
    assert rows_per_sample(4, 0) is None


def test_parts_are_summed_and_read_across_their_ranges_with_zeros_where_none_was_added():
    like = torch.zeros(6, 2)
    rows = Rows(like)
    rows.add(0, 2, torch.ones(2, 2))
    rows.add(0, 2, torch.ones(2, 2))
    rows.add(4, 6, torch.full((2, 2), 3.0))
    assert torch.equal(rows.of(0, 2), torch.full((2, 2), 2.0))
    assert torch.equal(rows.of(1, 5), torch.tensor([[2.0] * 2, [0.0] * 2, [0.0] * 2, [3.0] * 2]))


def test_samples_of_several_rows_each():
    rows = Rows(torch.zeros(6, 1), per_sample=2)
    rows.add(0, 1, torch.tensor([[1.0], [2.0]]))
    rows.add(2, 3, torch.tensor([[5.0], [6.0]]))
    assert torch.equal(rows.of(0, 3).view(-1), torch.tensor([1.0, 2.0, 0.0, 0.0, 5.0, 6.0]))
    assert torch.equal(rows.of(1, 2), torch.zeros(2, 1))


def test_a_range_over_other_parts_is_summed_with_them_into_one():
    """The micro-batches' output gradients (0:2, 2:4) and a whole segment's (0:4) at the same tensor."""
    rows = Rows(torch.zeros(6, 1))
    rows.add(0, 2, torch.tensor([[1.0], [2.0]]))
    rows.add(2, 4, torch.tensor([[3.0], [4.0]]))
    rows.add(0, 4, torch.full((4, 1), 10.0))
    rows.add(3, 6, torch.ones(3, 1))
    assert list(rows.parts) == [(0, 6)]
    assert torch.equal(rows.of(0, 6).view(-1), torch.tensor([11.0, 12.0, 13.0, 15.0, 1.0, 1.0]))
