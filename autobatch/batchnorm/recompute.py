"""BatchNorm calls that activation checkpointing makes again during backward.

``torch.utils.checkpoint`` recomputes a segment's forward when backward needs its activations,
so every BatchNorm inside it is called a second time. Plain PyTorch then updates the running
statistics (and ``num_batches_tracked``) twice; under two_pass the recomputed call must use the
full-batch statistics of the call it repeats, or the recomputed activations differ from those of
the forward. While backward runs, `intercept_batch_norm` routes training-mode calls to a
handler of this module instead::

    with intercept_batch_norm(two_pass.recompute):       # or recompute_with_own_statistics
        loss.backward()
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
from torch import Tensor

from autobatch.batchnorm.intercept import BatchNormCall

__all__ = ["RecomputedCalls", "quiet_checkpoint", "recompute_with_own_statistics"]

_Key = tuple[int, int, int, int, int]


def recompute_with_own_statistics(call: BatchNormCall) -> Tensor:
    """A recomputed call that normalizes with its own batch's statistics, as the forward did, and
    leaves the running statistics alone: they were updated by the forward."""
    # Copies, not None: the recomputation must save the tensors the forward saved (checkpoint checks).
    running_mean, running_var = (None if t is None else t.clone() for t in (call.running_mean, call.running_var))
    return torch.batch_norm(call.input, call.weight, call.bias, running_mean, running_var, True, 0.0, call.eps,
                            torch.backends.cudnn.enabled)


@contextlib.contextmanager
def quiet_checkpoint() -> Iterator[None]:
    """For phase 1: reentrant checkpointing warns that gradients will be None when no input needs
    one, which in a pass that computes no gradient says nothing. (Process-wide while it lasts.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="None of the inputs have requires_grad=True")
        yield


def _key(call: BatchNormCall) -> _Key:
    # The layer's own tensors identify it; a functional call without them is told apart by channels only.
    return (id(call.weight), id(call.bias), id(call.running_mean), id(call.running_var), call.input.shape[1])


class RecomputedCalls:
    """Which forward call a call made during backward repeats, for two_pass.

    A recomputation replays a segment's forward, so its calls come from layers the forward called;
    a layer that ran once per forward is matched at once. A layer that ran several times with the
    same number of channels cannot be told apart once recomputed, and raises.
    """

    def __init__(self) -> None:
        self._keys: list[_Key] = []
        self._matched: set[int] = set()

    def start_forward(self) -> None:
        self._keys = []
        self._matched = set()

    def forward_call(self, call: BatchNormCall) -> None:
        """Note the next call of the forward, in order."""
        self._keys.append(_key(call))

    def match(self, call: BatchNormCall, name: str) -> int:
        """The index of the forward call that ``call``, made during backward, repeats; ``name``
        names its layer in errors."""
        key = _key(call)
        candidates = [index for index, seen in enumerate(self._keys) if seen == key and index not in self._matched]
        layer = repr(name)
        if not candidates:
            raise RuntimeError(
                f"BatchNorm layer {layer} ran during backward more often than in the forward; autobatch "
                "expects calls during backward to come only from activation checkpointing recomputing "
                "the forward once (torch.utils.checkpoint).")
        if len(candidates) > 1:
            raise RuntimeError(
                f"BatchNorm layer {layer} runs {sum(seen == key for seen in self._keys)} times per forward "
                "and activation checkpointing recomputes it during backward; bn='two_pass' cannot tell which "
                "of its calls a recomputation repeats. Keep that layer's repeated calls outside the "
                "checkpointed segment, or use bn='micro'.")
        self._matched.add(candidates[0])
        return candidates[0]
