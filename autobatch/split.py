"""The splitter: how a logical batch is counted and cut into balanced micro-batches.

A batch is a tensor, a list of samples, or any nesting of tuples, lists and dicts of them. Tensors
share their first (batch) dimension; a list of samples holds one item per sample (torchvision's
detection targets, a list of dicts; images of different sizes, a list of tensors). Other leaves
pass to every micro-batch unchanged::

    >>> balanced_splits(16, 7)
    [6, 5, 5]
    >>> parts = split_batch({"image": x, "mask": y}, [6, 5, 5])
    >>> parts = split_batch((images, targets), [2, 2])      # torchvision detection: sub-lists

A list of tensors reads as batched tensors when their first dimensions give the batch's number of
samples (PyTorch's default collate gives ``[inputs, targets]``), and as a list of samples when
its tensors' first dimensions differ, or when its length is the batch's number of samples and
their first dimension is not (or the batch also holds a list of dicts: three 3-channel images).
Any other batch type is counted and cut by the user's functions (`CustomFormat`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["BatchFormat", "CustomFormat", "NestedFormat", "balanced_parts", "batch_format", "balanced_splits", "leaves",
           "map_tensors", "split_batch"]


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


# -- trees ------------------------------------------------------------------------------------------

Path = tuple[Any, ...]


def _is_namedtuple(tree: Any) -> bool:
    return isinstance(tree, tuple) and hasattr(tree, "_fields")


def _text(path: Path) -> str:
    return "batch" + "".join(f"[{key!r}]" for key in path)


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
    if _is_namedtuple(tree):
        return type(tree)(*(_rebuild(value, fn) for value in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_rebuild(value, fn) for value in tree)
    return fn(tree)


def map_tensors(tree: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``tree`` with every tensor leaf replaced by ``fn(leaf)``; other leaves are kept."""
    return _rebuild(tree, lambda leaf: fn(leaf) if isinstance(leaf, Tensor) else leaf)


# -- reading a batch: which lists hold samples, and how many samples ------------------------------

@dataclass(frozen=True)
class _Count:
    """One part of the batch and the samples it holds: a tensor's first dimension (``tensor``), a
    list of samples' length (``samples``), or a list of tensors that may be either (``either``)."""

    kind: str
    path: Path
    size: int
    #: For ``either``: the tensors' shared first dimension, the size if read as batched tensors.
    first_dim: int = 0


def _alike_tensors(items: list) -> bool:
    """Tensors that may be samples of one kind: the same number of dimensions and dtype (``(inputs,
    targets)`` of different kinds are never samples of one another)."""
    return bool(items) and all(isinstance(item, Tensor) and item.dim() > 0 for item in items) and len(
        {(item.dim(), item.dtype) for item in items}) == 1


def _counts(tree: Any, path: Path, found: list[_Count]) -> None:
    if isinstance(tree, Tensor):
        if tree.dim() == 0:
            raise ValueError(f"{_text(path)} is a 0-dim tensor and has no batch dimension; "
                             "give every tensor in the batch a leading batch dimension")
        found.append(_Count("tensor", path, tree.shape[0]))
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            _counts(value, path + (key,), found)
    elif isinstance(tree, (tuple, list)) and not _is_namedtuple(tree):
        items = list(tree)
        mappings = sum(isinstance(item, Mapping) for item in items)
        if items and mappings == len(items):
            found.append(_Count("samples", path, len(items)))
        elif mappings:
            kinds = sorted({type(item).__name__ for item in items if not isinstance(item, Mapping)})
            raise ValueError(f"{_text(path)} mixes {mappings} dicts with {len(items) - mappings} other items "
                             f"({', '.join(kinds)}): a list of samples holds samples of one kind. Give every sample "
                             "as a dict, or put the other parts beside the list (a tuple or dict of parts)")
        elif _alike_tensors(items):
            first_dims = {item.shape[0] for item in items}
            kind = "either" if len(first_dims) == 1 else "samples"
            found.append(_Count(kind, path, len(items), first_dims.pop() if kind == "either" else 0))
        else:
            for index, value in enumerate(items):
                _counts(value, path + (index,), found)
    elif isinstance(tree, tuple):  # a namedtuple: a structure, never samples
        for index, value in enumerate(tree):
            _counts(value, path + (index,), found)


def _disagree(a: tuple[Path, int, str], b: tuple[Path, int, str]) -> ValueError:
    """The short error for two parts of a batch with different numbers of samples."""
    parts = ", ".join(f"{_text(path)} has {size} ({what})" for path, size, what in (a, b))
    return ValueError(f"the batch's parts disagree on the number of samples: {parts}; each part must hold every "
                      "sample of the batch")


_WHAT = {"tensor": "first dimension", "samples": "a list of samples", "either": "first dimension"}


@dataclass(frozen=True)
class Reading:
    """How a batch reads: its number of samples, and the paths of the lists that hold samples."""

    size: int
    samples: frozenset[Path]


def read_batch(tree: Any) -> Reading:
    """The number of samples of ``tree`` and which of its lists are lists of samples (module docstring).
    Raises ``ValueError`` when there is no tensor, a tensor has no batch dimension, the batch is
    empty, or its parts disagree (naming the first two)."""
    found: list[_Count] = []
    _counts(tree, (), found)
    if not found:
        raise ValueError("the batch holds no tensor; pass tensors, lists of samples, or tuples, lists and dicts of "
                         "them (or give wrap num_samples= and split_batch= for a batch type of your own)")
    definite = [count for count in found if count.kind != "either"]
    either = [count for count in found if count.kind == "either"]
    known: Optional[tuple[Path, int, str]] = None
    for count in definite:
        if known is None:
            known = (count.path, count.size, _WHAT[count.kind])
        elif count.size != known[1]:
            raise _disagree(known, (count.path, count.size, _WHAT[count.kind]))
    has_sample_lists = any(count.kind == "samples" for count in definite)
    samples = {count.path for count in definite if count.kind == "samples"}
    if known is None:
        # Nothing else tells: PyTorch's default collate gives [inputs, targets], batched tensors.
        first = either[0]
        known = (first.path, first.first_dim, _WHAT["either"])
    for count in either:
        as_samples, as_batched = count.size == known[1], count.first_dim == known[1]
        if as_samples and (has_sample_lists or not as_batched):
            samples.add(count.path)
        elif not as_batched:
            raise _disagree(known, (count.path, count.size, _WHAT["samples"]) if has_sample_lists
                            else (count.path + (0,), count.first_dim, _WHAT["either"]))
    if known[1] == 0:
        raise ValueError("the batch is empty (no samples); skip empty batches before calling step()")
    return Reading(known[1], frozenset(samples))


def _cut(tree: Any, samples: frozenset[Path], path: Path, tensor: Callable[[Tensor], Any],
         items: Callable[[list], list]) -> Any:
    """``tree`` with each batched tensor replaced by ``tensor(it)`` and each list of samples by
    ``items(it)`` (of its type); other leaves kept."""
    if path in samples:
        return type(tree)(items(list(tree)))
    if isinstance(tree, Tensor):
        return tensor(tree)
    if isinstance(tree, Mapping):
        return type(tree)({key: _cut(value, samples, path + (key,), tensor, items) for key, value in tree.items()})
    if isinstance(tree, (tuple, list)):
        rebuilt = (_cut(value, samples, path + (index,), tensor, items) for index, value in enumerate(tree))
        return type(tree)(*rebuilt) if _is_namedtuple(tree) else type(tree)(rebuilt)
    return tree


def _paths_of(tree: Any, samples: frozenset[Path], path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every leaf of ``tree`` with its path, a list of samples counting as one leaf."""
    if path in samples or not isinstance(tree, (Mapping, tuple, list)):
        yield path, tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _paths_of(value, samples, path + (key,))
    else:
        for index, value in enumerate(tree):
            yield from _paths_of(value, samples, path + (index,))


def _samples_of(tree: Any, samples: frozenset[Path]) -> Iterator[tuple[Any, bool]]:
    """Each batched tensor (False) and each list of samples (True) of ``tree``."""
    for path, part in _paths_of(tree, samples):
        if path in samples or isinstance(part, Tensor):
            yield part, path in samples


def _non_finite(tree: Any) -> bool:
    return any(isinstance(leaf, Tensor) and leaf.is_floating_point() and not bool(torch.isfinite(leaf).all())
               for _, leaf in leaves(tree))


# -- formats ------------------------------------------------------------------------------------------

class BatchFormat:
    """How a step counts, cuts and moves the batches it is given; decided once, at ``wrap``."""

    def size(self, batch: Any) -> int:
        """The number of samples in ``batch``."""
        raise NotImplementedError

    def split(self, batch: Any, sizes: Sequence[int]) -> list[Any]:
        """``batch`` cut into ``len(sizes)`` parts of those many samples, in order."""
        raise NotImplementedError

    def take(self, batch: Any, count: int) -> Any:
        """The first ``count`` samples of ``batch``, repeating its samples when it holds fewer."""
        raise NotImplementedError

    def to(self, batch: Any, device: torch.device) -> Any:
        """``batch`` with its tensors on ``device`` (no copy for those already there)."""
        non_blocking = device.type == "cuda"
        return map_tensors(batch, lambda leaf: leaf.to(device, non_blocking=non_blocking))

    def tensors(self, batch: Any) -> list[Tensor]:
        """Every tensor the batch holds (the planner leaves the batch's own memory out)."""
        return [leaf for _, leaf in leaves(batch) if isinstance(leaf, Tensor)]

    def non_finite_samples(self, batch: Any) -> list[int]:
        """The samples with a NaN or infinite value in a floating-point tensor, where it can tell."""
        return []

    def sample_size(self, batch: Any) -> int:
        """Elements per sample, the size a step's activations follow (autobatch.planning.model)."""
        size = self.size(batch)
        return max(1, sum(t.numel() for t in self.tensors(batch)) // size)

    def describe(self, batch: Any) -> list[str]:
        """What of the batch's kind changes a step's memory, for the plan cache's key: structure, dtypes
        and numbers of dimensions, not the sizes a batch's samples may vary in (the memory model's)."""
        return [f"{path}:{leaf.dim()}:{leaf.dtype}" if isinstance(leaf, Tensor)
                else f"{path}:{type(leaf).__name__}" for path, leaf in leaves(batch)]


class NestedFormat(BatchFormat):
    """Tensors, lists of samples and any nesting of tuples, lists and dicts of them (module docstring)."""

    def size(self, batch: Any) -> int:
        return read_batch(batch).size

    def split(self, batch: Any, sizes: Sequence[int]) -> list[Any]:
        reading = read_batch(batch)
        sizes = list(sizes)
        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        pieces: dict[int, Any] = {}

        def tensor(leaf: Tensor, j: int) -> Tensor:
            if id(leaf) not in pieces:
                pieces[id(leaf)] = torch.split(leaf, sizes)
            return pieces[id(leaf)][j]

        return [_cut(batch, reading.samples, (), lambda leaf, j=j: tensor(leaf, j),
                     lambda items, j=j: items[starts[j]:starts[j] + sizes[j]]) for j in range(len(sizes))]

    def take(self, batch: Any, count: int) -> Any:
        reading = read_batch(batch)
        if count <= reading.size:
            return _cut(batch, reading.samples, (), lambda leaf: leaf[:count], lambda items: items[:count])
        index = torch.arange(count) % reading.size
        return _cut(batch, reading.samples, (), lambda leaf: leaf[index.to(leaf.device)],
                    lambda items: [items[i] for i in index.tolist()])

    def non_finite_samples(self, batch: Any) -> list[int]:
        bad: set[int] = set()
        for part, is_list in _samples_of(batch, read_batch(batch).samples):
            if is_list:
                bad.update(index for index, item in enumerate(part) if _non_finite(item))
            elif part.is_floating_point():
                rows = ~torch.isfinite(part.detach().reshape(part.shape[0], -1)).all(1)
                bad.update(rows.nonzero().flatten().tolist())
        return sorted(bad)

    def sample_size(self, batch: Any) -> int:
        """Elements per sample: a batched tensor's per row, a list of samples' padded to its largest in
        each dimension (as torchvision pads a batch of images), summed over the batch's parts."""
        reading = read_batch(batch)
        total = 0
        for part, is_list in _samples_of(batch, reading.samples):
            if not is_list:
                total += part.numel() // max(part.shape[0], 1)
                continue
            largest: dict[str, list[int]] = {}
            for item in part:
                for path, leaf in leaves(item, "sample"):
                    if isinstance(leaf, Tensor):
                        key = f"{path}:{leaf.dim()}"
                        largest[key] = [max(a, b) for a, b in zip(largest.get(key, leaf.shape), leaf.shape)]
            total += sum(math.prod(shape) for shape in largest.values())
        return max(1, total)

    def describe(self, batch: Any) -> list[str]:
        reading = read_batch(batch)
        described = []
        for path, part in _paths_of(batch, reading.samples):
            if path in reading.samples:
                # A list of samples by the structure of its first sample: sizes vary from batch to batch.
                described.append(f"{_text(path)}:samples:" + ",".join(
                    f"{inner}:{leaf.dtype}:{leaf.dim()}" if isinstance(leaf, Tensor) else f"{inner}:{type(leaf).__name__}"
                    for inner, leaf in leaves(part[0], "sample")))
            elif isinstance(part, Tensor):
                described.append(f"{_text(path)}:{part.dim()}:{part.dtype}")
            else:
                described.append(f"{_text(path)}:{type(part).__name__}")
        return described


class CustomFormat(BatchFormat):
    """A batch type of the user's own, counted by ``num_samples(batch)`` and cut by
    ``split_batch(batch, sizes)``, which returns ``len(sizes)`` batches of those many samples::

        autobatch.wrap(model, optimizer, 16, compute_loss=..., num_samples=lambda g: g.num_graphs,
                       split_batch=lambda g, sizes: [g[i:i + n] for i, n in zip(offsets(sizes), sizes)])

    The batch moves to the device with its own ``to(device)`` where it has one, else tensor by tensor.
    """

    def __init__(self, num_samples: Callable[[Any], int], split_batch: Callable[[Any, list[int]], Sequence[Any]]):
        self.num_samples = num_samples
        self.split_batch = split_batch

    def size(self, batch: Any) -> int:
        size = self.num_samples(batch)
        if isinstance(size, Tensor) and size.numel() == 1:
            size = size.item()
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"num_samples returned {size!r}; it must return the batch's number of samples as an int")
        if size == 0:
            raise ValueError("the batch is empty (num_samples returned 0); skip empty batches before calling step()")
        return size

    def split(self, batch: Any, sizes: Sequence[int]) -> list[Any]:
        sizes = list(sizes)
        if len(sizes) == 1:
            return [batch]
        parts = list(self.split_batch(batch, sizes))
        got = [self.size(part) for part in parts] if len(parts) == len(sizes) else None
        if got != sizes:
            raise ValueError(f"split_batch(batch, {sizes}) returned parts of {got if got is not None else len(parts)} "
                             f"{'samples' if got is not None else 'parts'}; it must return one batch per size, "
                             "of that many samples, in order")
        return parts

    def take(self, batch: Any, count: int) -> Any:
        size = self.size(batch)
        if count > size:
            raise ValueError(f"autobatch needs {count} samples of this batch type to measure a step but the batch holds "
                             f"{size}; with split_batch it cannot repeat samples: plan on a full batch (ab.tune(batch)) "
                             "or give micro_batch as an int")
        return batch if count == size else self.split(batch, [count, size - count])[0]

    def to(self, batch: Any, device: torch.device) -> Any:
        if not isinstance(batch, (Tensor, Mapping, tuple, list)) and callable(getattr(batch, "to", None)):
            return batch.to(device)
        return super().to(batch, device)

    def tensors(self, batch: Any) -> list[Tensor]:
        found = super().tensors(batch)
        for _, leaf in leaves(batch):
            if not isinstance(leaf, Tensor) and hasattr(leaf, "__dict__"):
                found += super().tensors(list(vars(leaf).values()))
        return found

    def describe(self, batch: Any) -> list[str]:
        return [f"{type(batch).__module__}.{type(batch).__qualname__}"] + sorted(
            f"{tensor.dtype}:{tensor.dim()}" for tensor in self.tensors(batch))


def batch_format(num_samples: Optional[Callable[[Any], int]] = None,
                 split_batch: Optional[Callable[[Any, list[int]], Sequence[Any]]] = None) -> BatchFormat:
    """``wrap``'s batch format: the user's functions (both, or neither), else `NestedFormat`."""
    if (num_samples is None) != (split_batch is None):
        raise TypeError("give num_samples and split_batch together: num_samples(batch) counts a batch of your own "
                        "type and split_batch(batch, sizes) cuts it into parts of those sizes")
    for name, value in (("num_samples", num_samples), ("split_batch", split_batch)):
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return NestedFormat() if num_samples is None else CustomFormat(num_samples, split_batch)


#: The default format, for `split_batch`.
_NESTED = NestedFormat()


def split_batch(tree: Any, sizes: Sequence[int]) -> list[Any]:
    """``tree`` cut into ``len(sizes)`` parts: tensors as views along dim 0, lists of samples as
    sub-lists; other leaves are shared by every part."""
    return _NESTED.split(tree, sizes)
