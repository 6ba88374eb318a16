"""Splitting a logical batch into balanced micro-batches.

A batch is a tensor or any nesting of tuples, lists and dicts whose tensor
leaves share their first (batch) dimension; other leaves pass through::

    >>> balanced_splits(16, 7)
    [6, 5, 5]
    >>> parts = split_batch({"image": x, "mask": y}, [6, 5, 5])
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

__all__ = ["balanced_parts", "balanced_splits", "batch_size", "leaves", "map_tensors", "non_finite_samples",
           "split_batch", "take",
           "to_device"]


def balanced_splits(batch: int, micro_batch: int) -> list[int]:
    """Sizes of the fewest micro-batches of at most ``micro_batch`` samples, differing by at most one."""
    if batch < 1:
        raise ValueError(f"cannot split a batch of {batch} samples; a batch needs at least one sample")
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be at least 1, got {micro_batch}")
    return balanced_parts(batch, math.ceil(batch / micro_batch))


def balanced_parts(batch: int, count: int) -> list[int]:
    """``batch`` samples in ``count`` parts differing by at most one (parts of 0 when batch < count)."""
    base, extra = divmod(batch, count)
    return [base + 1] * extra + [base] * (count - extra)


def leaves(tree: Any, path: str = "batch") -> Iterator[tuple[str, Any]]:
    """Every leaf of ``tree`` with a readable path such as ``batch['image']``."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from leaves(value, f"{path}[{key!r}]")
    elif isinstance(tree, (tuple, list)):
        for index, value in enumerate(tree):
            yield from leaves(value, f"{path}[{index}]")
    else:
        yield path, tree


def _rebuild(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """``tree`` with every leaf replaced by ``fn(leaf)``, keeping containers (namedtuples too)."""
    if isinstance(tree, Mapping):
        return type(tree)({key: _rebuild(value, fn) for key, value in tree.items()})
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_rebuild(value, fn) for value in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_rebuild(value, fn) for value in tree)
    return fn(tree)


def map_tensors(tree: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``tree`` with every tensor leaf replaced by ``fn(leaf)``; other leaves are kept."""
    return _rebuild(tree, lambda leaf: fn(leaf) if isinstance(leaf, torch.Tensor) else leaf)


def batch_size(tree: Any) -> int:
    """The shared first dimension of every tensor in ``tree``.

    Raises ``ValueError`` naming the offending leaves when there is no tensor,
    when a tensor has no batch dimension, when sizes disagree, or when the batch is empty.
    """
    sizes: dict[str, int] = {}
    for path, leaf in leaves(tree):
        if isinstance(leaf, torch.Tensor):
            if leaf.dim() == 0:
                raise ValueError(f"{path} is a 0-dim tensor and has no batch dimension; "
                                 "give every tensor in the batch a leading batch dimension")
            sizes[path] = leaf.shape[0]
    if not sizes:
        raise ValueError("the batch holds no tensor; pass tensors (or tuples, lists, dicts of tensors) "
                         "whose first dimension is the batch")
    distinct = set(sizes.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{path}: {size}" for path, size in sizes.items())
        raise ValueError(f"tensors in the batch disagree on the batch dimension ({listing}); "
                         "every tensor must have the same first dimension")
    (size,) = distinct
    if size == 0:
        raise ValueError("the batch is empty (batch dimension 0); skip empty batches before calling step()")
    return size


def non_finite_samples(tree: Any) -> list[int]:
    """The samples (rows of the batch) with a NaN or infinite value in any floating-point tensor."""
    bad: set[int] = set()
    for _, leaf in leaves(tree):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.dim() > 0:
            rows = ~torch.isfinite(leaf.detach().reshape(leaf.shape[0], -1)).all(1)
            bad.update(rows.nonzero().flatten().tolist())
    return sorted(bad)


def split_batch(tree: Any, sizes: Sequence[int]) -> list[Any]:
    """``tree`` cut along dim 0 into ``len(sizes)`` views; non-tensor leaves are shared by every part."""
    pieces = {id(leaf): torch.split(leaf, list(sizes)) for _, leaf in leaves(tree) if isinstance(leaf, torch.Tensor)}
    return [map_tensors(tree, lambda leaf, j=j: pieces[id(leaf)][j]) for j in range(len(sizes))]


def take(tree: Any, count: int) -> Any:
    """The first ``count`` samples of ``tree``, repeating its samples when it holds fewer."""
    size = batch_size(tree)
    if count <= size:
        return map_tensors(tree, lambda leaf: leaf[:count])
    index = torch.arange(count) % size
    return map_tensors(tree, lambda leaf: leaf[index.to(leaf.device)])


def to_device(tree: Any, device: torch.device) -> Any:
    """``tree`` with its tensors on ``device`` (no copy for those already there)."""
    non_blocking = device.type == "cuda"
    return map_tensors(tree, lambda leaf: leaf.to(device, non_blocking=non_blocking))
