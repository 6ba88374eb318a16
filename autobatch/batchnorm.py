"""BatchNorm over a logical batch that runs as several micro-batches.

Every training-mode ``F.batch_norm`` call goes through a handler while
:func:`intercept_batch_norm` is active, so nn.BatchNorm1d/2d/3d, SyncBatchNorm
outside a process group and subclasses that call ``F.batch_norm`` themselves
(timm's BatchNormAct2d) all take part without any change to the model.
Calls are matched between passes by their order in the forward::

    two_pass = TwoPassBatchNorm(names)
    with torch.no_grad(), intercept_batch_norm(two_pass.record):
        model(whole_batch)                  # phase 1: full-batch statistics, running stats once
    with intercept_batch_norm(two_pass.apply):
        for part in micro_batches:          # phase 2: those statistics, projected backward
            two_pass.start_micro_batch()
            loss_fn(model(part), ...).backward()
            two_pass.finish_micro_batch()
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from autobatch.distributed import Ranks
from autobatch.intercept import BatchNormCall, intercept_batch_norm
from autobatch.recompute import RecomputedCalls

__all__ = [
    "BatchNormCall",
    "BatchNormState",
    "PooledBatchNorm",
    "StopForward",
    "TwoPassBatchNorm",
    "batch_norm_modules",
    "batch_norm_names",
    "chan_merge",
    "channel_means",
    "check_same_channels",
    "check_values_per_channel",
    "different_calls",
    "full_batch_statistics",
    "intercept_batch_norm",
    "local_statistics",
    "name_of",
    "normalize",
    "update_running",
    "uses_batch_statistics",
    "with_own_statistics",
]

_is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", lambda: False)  # torch >= 2.3

#: A micro-batch layer with fewer values per channel than this gets a warning:
#: the projected backward takes its subtracted means from one micro-batch (see the README's limits).
FEW_VALUES_PER_CHANNEL = 32


class StopForward(BaseException):
    """Raised after the last BatchNorm call of phase 1: the rest of the forward is not needed.

    A BaseException, so that a model's own ``except Exception`` does not swallow it.
    """


def batch_norm_modules(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of ``model`` (SyncBatchNorm and subclasses included)."""
    return [module for module in model.modules() if isinstance(module, _BatchNorm)]


def batch_norm_names(model: nn.Module) -> dict[int, str]:
    """Qualified layer names keyed by the id of each BatchNorm's weight and running_mean, for messages."""
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            for tensor in (module.weight, module.running_mean):
                if tensor is not None:
                    names[id(tensor)] = name or type(module).__name__
    return names


def uses_batch_statistics(modules: list[_BatchNorm]) -> bool:
    """Whether any layer will normalize with batch statistics (training mode, or no running statistics)."""
    return any(module.training or module.running_mean is None for module in modules)


def name_of(call: BatchNormCall, names: dict[int, str], index: Optional[int]) -> str:
    """The layer's qualified name; for a functional call, its place in the forward (``index``)."""
    for tensor in (call.weight, call.running_mean):
        if tensor is not None and id(tensor) in names:
            return names[id(tensor)]
    return "a functional batch_norm call" if index is None else f"batch_norm call #{index}"


class _ProjectedBatchNorm(torch.autograd.Function):
    """Normalize with given statistics; backward projects with means over this micro-batch.

    The backward is ``native_batch_norm_backward`` in training mode fed the micro-batch's own mean
    and the full batch's ``invstd``: ``xhat`` is then centred within the micro-batch, so the input
    gradient sums to zero per channel (BatchNorm's shift invariance) as the full batch's does. Fed
    the full batch's mean instead, ``mean_k(xhat) != 0`` leaves a gradient along a constant shift of
    the input that the loss cannot see, and biases before the layer drift (bench/fidelity_real.py).
    """

    @staticmethod
    def forward(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                mean: Tensor, invstd: Tensor, var: Tensor, eps: float, micro_mean: Tensor) -> Tensor:
        ctx.save_for_backward(input, weight, mean, invstd, micro_mean)
        ctx.eps = eps
        # Eval-mode batch_norm with the full-batch statistics is the fused full-batch forward.
        return torch.batch_norm(input, weight, bias, mean, var, False, 0.0, eps,
                                torch.backends.cudnn.enabled)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, weight, mean, invstd, micro_mean = ctx.saved_tensors
        wants_weight = weight is not None and ctx.needs_input_grad[1]
        # dbeta is needed for dgamma's correction below even when the bias needs no gradient.
        mask = [ctx.needs_input_grad[0], wants_weight, ctx.needs_input_grad[2] or wants_weight]
        grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_output, input, weight, None, None, micro_mean, invstd, True, ctx.eps, mask)
        if wants_weight:
            # The kernel's dgamma is sum(g * xhat_centred); the forward's xhat is that plus (mean_k - mean) * invstd.
            grad_weight = grad_weight + (micro_mean - mean) * invstd * grad_bias
        return (grad_input, grad_weight, grad_bias if ctx.needs_input_grad[2] else None,
                None, None, None, None, None)


def channel_means(input: Tensor, dtype: torch.dtype, per_sample: bool = False) -> Tensor:
    """Per-channel means of a BatchNorm input (N, C, ...): over everything but the channels, or with
    ``per_sample`` over the positions of each sample only, shape (N, C)."""
    dims = list(range(2, input.dim())) if per_sample else [0] + list(range(2, input.dim()))
    return input.to(dtype) if not dims else input.mean(dims, dtype=dtype)


#: How far (in the full batch's standard deviations) a micro-batch's BatchNorm input mean may lie
#: from phase 1's mean of the same samples before the step is refused: rounding, another memory
#: format or bf16 autocast moved it by 1e-6 and less on the CPU (README); GPUs are not measured yet.
#: The rounding of the mean itself (a channel with a large mean and a tiny spread) is allowed on top.
REPLAY_TOLERANCE = {torch.float64: 1e-6, torch.float32: 0.02}
#: Half-precision inputs (autocast) round activations to 3 significant digits.
REPLAY_TOLERANCE_HALF = 0.1


@dataclass
class LayerStatistics:
    """Full-batch statistics of one BatchNorm call, recorded in phase 1."""

    name: str
    mean: Tensor
    invstd: Tensor
    var: Tensor
    eps: float
    values_per_channel: int
    #: Phase 1's per-sample channel means (samples, C) of this rank's samples from ``first_row`` on;
    #: None where phase 1 ran in chunks (each normalized with its own statistics, so the micro-batches
    #: cannot be compared with it), which leaves the micro-batches unchecked.
    sample_means: Optional[Tensor] = None
    first_row: int = 0


def _phase1_means(layer: LayerStatistics, rows: tuple[int, int]) -> Optional[Tensor]:
    """Phase 1's channel means of the samples ``rows`` of the logical batch; None where it has none."""
    start, stop = (row - layer.first_row for row in rows)
    if layer.sample_means is None or start < 0 or stop > len(layer.sample_means):
        return None
    return layer.sample_means[start:stop].mean(0)


def check_values_per_channel(count: float, name: str) -> None:
    # The same check F.batch_norm makes, so a bad full batch fails as it would without autobatch.
    if count <= 1:
        raise ValueError(f"BatchNorm layer {name!r} gets 1 value per channel for the whole logical batch; "
                         "training BatchNorm needs more than one")


def chan_merge(count_a: float, mean_a: Tensor, m2_a: Tensor, count_b: float, mean_b: Tensor,
               m2_b: Tensor) -> tuple[float, Tensor, Tensor]:
    """Chan et al.'s merge of two sets' per-channel count, mean and sum of squared deviations."""
    count = count_a + count_b
    delta = mean_b - mean_a
    return count, mean_a + delta * (count_b / count), m2_a + m2_b + delta.square() * (count_a * count_b / count)


def _variance(invstd: Tensor, eps: float) -> Tensor:
    # Recovered in float64 so that a variance far below eps keeps its digits.
    return (invstd.double().pow(-2) - eps).clamp_(min=0).to(invstd.dtype)


@torch.no_grad()
def update_running(running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                    mean: Tensor, var: Tensor, count: float) -> None:
    """nn.BatchNorm's update for one batch of ``count`` values per channel with biased ``var``."""
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    if running_var is not None:
        unbiased = var * (count / max(count - 1, 1))
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def local_statistics(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a BatchNorm input (in float32 at least)."""
    precise = x if x.dtype in (torch.float32, torch.float64) else x.float()
    # BatchNorm's own kernel: on CPU several times faster than var_mean over (N, H, W).
    _, mean, invstd = torch.ops.aten.native_batch_norm(precise, None, None, None, None, True, 0.0, eps)
    return mean, _variance(invstd, eps)


@torch.no_grad()
def full_batch_statistics(ranks: Ranks, name: str, eps: float, running_mean: Optional[Tensor],
                          running_var: Optional[Tensor], momentum: float, count: float, mean: Tensor,
                          m2: Tensor) -> LayerStatistics:
    """One layer's statistics over this rank's (count, mean, m2) and every other rank's, with the
    running statistics updated from them once."""
    count, mean, m2 = ranks.merge(count, mean, m2)
    check_values_per_channel(count, name)
    var = m2 / count
    update_running(running_mean, running_var, momentum, mean, var, count)
    return LayerStatistics(name, mean, (var + eps).rsqrt(), var, eps, int(count))


def normalize(call: BatchNormCall, layer: LayerStatistics) -> Tensor:
    """``call``'s input normalized with ``layer``'s statistics (no gradient through them)."""
    return torch.batch_norm(call.input, call.weight, call.bias, layer.mean, layer.var, False, 0.0, layer.eps,
                            torch.backends.cudnn.enabled)


def different_calls(more: str, fewer: str, calls: int) -> RuntimeError:
    """The error for a forward that made more BatchNorm calls than the other (``calls``)."""
    return RuntimeError(
        f"the {more} forward made more training-mode BatchNorm calls than the {fewer} forward ({calls}); "
        "bn='two_pass' needs the same sequence of BatchNorm calls for every batch. Use bn='micro' for models "
        "whose BatchNorm calls depend on the data.")


def check_same_channels(micro: int, full: int, index: int, name: str) -> None:
    if micro != full:
        raise RuntimeError(
            f"BatchNorm call #{index} has {micro} channels in a micro-batch but {full} in the full batch "
            f"({name!r}); bn='two_pass' needs the same sequence of BatchNorm calls for every batch. Use "
            "bn='micro' for such models.")


class TwoPassBatchNorm:
    """bn="two_pass": full-batch statistics from a no-grad pass, then micro-batches that use them.

    ``record`` is phase 1's handler: it normalizes with the batch's statistics, updates the running
    statistics as nn.BatchNorm does for one full batch, and keeps mean and invstd. ``apply`` is
    phase 2's: the same outputs as the full batch, the projected backward, running statistics untouched.
    """

    def __init__(self, names: dict[int, str], ranks: Optional[Ranks] = None):
        self.names = names
        self.ranks = ranks or Ranks()
        self.layers: list[LayerStatistics] = []
        #: Number of calls seen in the last complete phase 1; phase 1 stops after that many.
        self.calls_per_forward: Optional[int] = None
        self._cursor = 0
        self._recomputed = RecomputedCalls()
        #: Per layer, phase 1's channel means of the running micro-batch's samples (None: unchecked),
        #: computed when it starts: the forward, perhaps traced by torch.compile, reads no row numbers.
        self._expected: list[Optional[Tensor]] = []
        #: (call index, how far its micro-batch mean lies from phase 1's for the same samples, tolerance):
        #: the running micro-batch's, which starts empty (torch.compile guards on the list's length),
        #: and the earlier ones of this step.
        self._deviations: list[tuple[int, Tensor, float]] = []
        self._checked: list[tuple[int, Tensor, float]] = []

    def start_statistics_pass(self) -> None:
        self.layers = []
        self._deviations, self._checked = [], []

    def record(self, call: BatchNormCall) -> Tensor:
        name = name_of(call, self.names, len(self.layers))
        if self.ranks.active:
            output, layer = self._record_across_ranks(call, name)
        else:
            check_values_per_channel(call.values_per_channel, name)
            output, mean, invstd = torch.ops.aten.native_batch_norm(
                call.input, call.weight, call.bias, call.running_mean, call.running_var, True,
                call.momentum, call.eps)
            layer = LayerStatistics(name, mean, invstd, _variance(invstd, call.eps), call.eps,
                                    call.values_per_channel)
        layer.sample_means = channel_means(call.input.detach(), layer.mean.dtype, per_sample=True)
        self.layers.append(layer)
        self.stop_after_last_call()
        return output

    def stop_after_last_call(self) -> None:
        """Ends phase 1's forward with :class:`StopForward` once it has made every BatchNorm call.
        Not under torch.compile: dynamo would give up on the traced forward, and compile each call apart."""
        if not _is_compiling() and len(self.layers) == self.calls_per_forward:
            raise StopForward

    def _record_across_ranks(self, call: BatchNormCall, name: str) -> tuple[Tensor, LayerStatistics]:
        """The statistics of every rank's batch together, as SyncBatchNorm computes them."""
        mean, var = local_statistics(call.input, call.eps)
        layer = self.merge(call, name, call.values_per_channel, mean, var * call.values_per_channel, call.momentum)
        return normalize(call, layer), layer

    def merge(self, call: BatchNormCall, name: str, count: float, mean: Tensor, m2: Tensor,
              momentum: float) -> LayerStatistics:
        """The full batch's statistics from this rank's (count, mean, m2) and every other rank's;
        the running statistics are updated with them, once."""
        return full_batch_statistics(self.ranks, name, call.eps, call.running_mean, call.running_var, momentum,
                                     count, mean, m2)

    def finish_statistics_pass(self, complete: bool) -> None:
        """``complete``: the forward ran to its end, so the number of calls is known exactly."""
        if complete:
            self.calls_per_forward = len(self.layers)

    def start_micro_batch(self, counted: bool = True, rows: Optional[tuple[int, int]] = None) -> None:
        """``counted`` is PooledBatchNorm's: two_pass keeps the full batch's statistics either way.
        ``rows``: the samples of the logical batch that the micro-batch holds, checked against phase 1."""
        self._cursor = 0
        self._expected = [] if rows is None else [_phase1_means(layer, rows) for layer in self.layers]
        self._checked += self._deviations
        self._deviations = []
        self._recomputed.start_forward()

    def apply(self, call: BatchNormCall) -> Tensor:
        index = self._cursor
        self._cursor += 1
        if index >= len(self.layers):
            raise different_calls("micro-batch", "full-batch", len(self.layers))
        self._recomputed.forward_call(call)
        return self.project(call, self.layers[index], index, check=True)

    def recompute(self, call: BatchNormCall) -> Tensor:
        """A call made again during the micro-batch's backward by activation checkpointing: the
        statistics and projected backward of the forward call it repeats (see autobatch.recompute)."""
        index = self._recomputed.match(call, name_of(call, self.names, None))
        return self.project(call, self.layers[index], index)

    def project(self, call: BatchNormCall, layer: LayerStatistics, index: int, check: bool = False) -> Tensor:
        """``call``'s input normalized with ``layer``'s full-batch statistics, with the projected backward.
        ``check``: compare the micro-batch's mean with phase 1's for the same samples (see :meth:`check`)."""
        check_same_channels(call.input.shape[1], layer.mean.shape[0], index, layer.name)
        micro_mean = channel_means(call.input.detach(), layer.mean.dtype)
        phase1 = self._expected[index] if check and index < len(self._expected) else None
        if phase1 is not None:
            tolerance = REPLAY_TOLERANCE.get(call.input.dtype, REPLAY_TOLERANCE_HALF)
            rounding = 64 * torch.finfo(call.input.dtype).eps * phase1.abs()
            deviation = ((micro_mean - phase1).abs() - rounding).clamp(min=0) * layer.invstd
            self._deviations.append((index, deviation.amax(), tolerance))
        return _ProjectedBatchNorm.apply(call.input, call.weight, call.bias, layer.mean, layer.invstd,
                                         layer.var, layer.eps, micro_mean)

    def non_finite_samples(self) -> Optional[tuple[str, list[int]]]:
        """The first layer, in forward order, whose phase-1 input is not finite for some samples, and
        those samples (rows of this rank's batch); None when phase 1 kept no per-sample means."""
        for layer in self.layers:
            if layer.sample_means is not None:
                bad = ~torch.isfinite(layer.sample_means).all(1)
                if bad.any():
                    return layer.name, bad.nonzero().flatten().tolist()
        return None

    def check(self) -> Optional[RuntimeError]:
        """The error for a step whose micro-batches fed a BatchNorm other inputs than phase 1 measured
        for the same samples; None if they agree. One device sync, for the whole step."""
        checked = self._checked + self._deviations
        if not checked:
            return None
        values = torch.stack([deviation for _, deviation, _ in checked]).tolist()
        for (index, _, tolerance), value in zip(checked, values):
            if value > tolerance:
                return RuntimeError(
                    f"BatchNorm layer {self.layers[index].name!r} got inputs in a micro-batch whose mean lies "
                    f"{value:.3g} standard deviations from phase 1's for the same samples (rounding allows "
                    f"{tolerance}); bn='two_pass' needs each micro-batch's forward to repeat phase 1's. Likely "
                    "causes: a random operation autobatch does not replay (it replays dropout, stochastic depth "
                    "and torch's random functions), or a layer whose output depends on the other samples of the "
                    "batch. No optimizer step was taken and the model is unchanged; use bn='micro' for this model.")
        return None

    def add(self, call: BatchNormCall, layer: LayerStatistics) -> None:
        """A layer recorded while the first micro-batch runs (see autobatch.lockstep): counted as its call."""
        self.layers.append(layer)
        self._cursor = len(self.layers)
        self._recomputed.forward_call(call)

    def finish_micro_batch(self) -> None:
        if self._cursor != len(self.layers):
            raise RuntimeError(
                f"the micro-batch forward made {self._cursor} training-mode BatchNorm calls but the "
                f"full-batch forward made {len(self.layers)}; bn='two_pass' needs the same sequence of "
                "BatchNorm calls for every batch. Use bn='micro' for such models.")

    def thin_layers(self, smallest_split: int, batch: int) -> list[tuple[str, int]]:
        """Layers whose micro-batches hold fewer than FEW_VALUES_PER_CHANNEL values per channel."""
        thin = []
        for layer in self.layers:
            values = layer.values_per_channel * smallest_split // batch
            if values < FEW_VALUES_PER_CHANNEL:
                thin.append((layer.name, values))
        return thin


def with_own_statistics(call: BatchNormCall) -> tuple[Tensor, Tensor, Tensor]:
    """Output, mean and invstd of ``call`` normalized with its own batch's statistics; running ones untouched."""
    return torch.ops.aten.native_batch_norm(call.input, call.weight, call.bias, None, None, True, 0.0, call.eps)


@dataclass
class _Pool:
    """One layer's per-channel count, mean and sum of squared deviations, merged micro-batch by micro-batch."""

    name: str
    eps: float
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    momentum: float
    count: int
    mean: Tensor
    m2: Tensor

    def merge(self, count: int, mean: Tensor, var: Tensor) -> None:
        self.count, self.mean, self.m2 = chan_merge(self.count, self.mean, self.m2, count, mean, var * count)


class PooledBatchNorm:
    """bn="micro": each micro-batch normalizes with its own statistics (ordinary accumulation);
    the running statistics are committed once per logical batch from the pooled statistics.

    Also phase 1 of two_pass when the whole batch does not fit: :meth:`commit` then returns the
    pooled statistics of the chunks for phase 2.
    """

    def __init__(self, names: dict[int, str], ranks: Optional[Ranks] = None):
        self.names = names
        self.ranks = ranks or Ranks()
        self._pools: list[_Pool] = []
        self._cursor = 0
        self._counted = True

    def start_micro_batch(self, counted: bool = True, rows: Optional[tuple[int, int]] = None) -> None:
        """``counted=False``: a padding micro-batch (a rank with fewer samples than splits), left out.
        ``rows`` is TwoPassBatchNorm's: each micro-batch uses its own statistics here."""
        self._cursor = 0
        self._counted = counted

    def handle(self, call: BatchNormCall) -> Tensor:
        index = self._cursor
        self._cursor += 1
        name = name_of(call, self.names, index)
        check_values_per_channel(call.values_per_channel, name)
        output, mean, invstd = with_own_statistics(call)
        with torch.no_grad():
            mean, var, count = mean.detach(), _variance(invstd.detach(), call.eps), call.values_per_channel
            if self._counted and index == len(self._pools):
                # The first micro-batch's momentum is the full batch's: the layer counted this batch once.
                self._pools.append(_Pool(name, call.eps, call.running_mean, call.running_var, call.momentum,
                                         count, mean, var * count))
            elif self._counted:
                self._pools[index].merge(count, mean, var)
        return output

    def finish_micro_batch(self) -> None:
        self._cursor = 0

    @staticmethod
    def recompute(call: BatchNormCall) -> Tensor:
        """A call made again during backward by activation checkpointing: the forward's output,
        left out of the pooled statistics (see autobatch.recompute)."""
        return with_own_statistics(call)[0]

    @torch.no_grad()
    def commit(self) -> list[LayerStatistics]:
        """Update the running statistics once, as nn.BatchNorm would for the whole logical batch
        (pooled over ranks too), and return those statistics: phase 2's, for a chunked phase 1."""
        layers = [full_batch_statistics(self.ranks, pool.name, pool.eps, pool.running_mean, pool.running_var,
                                        pool.momentum, pool.count, pool.mean, pool.m2) for pool in self._pools]
        self._pools = []
        return layers


class BatchNormState:
    """A snapshot of every BatchNorm buffer: undoes a failed step, and keeps each layer's
    ``num_batches_tracked`` counting a logical batch once although the layer runs once per micro-batch."""

    def __init__(self, modules: list[_BatchNorm]):
        self._buffers = [buffer for module in modules
                         for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
                         if buffer is not None]
        self._saved = [buffer.clone() for buffer in self._buffers]
        self._counters = [module.num_batches_tracked for module in modules
                          if module.num_batches_tracked is not None]
        self._counted: list[Tensor] = []

    def mark_counted(self) -> None:
        """Call after the first forward of the logical batch: its counters are the right ones."""
        self._counted = [counter.clone() for counter in self._counters]

    def keep_counted(self) -> None:
        """Undo the counting done by later forwards of the same logical batch."""
        for counter, counted in zip(self._counters, self._counted):
            counter.copy_(counted)

    def restore(self) -> None:
        """Put every buffer back as it was when the snapshot was taken."""
        for buffer, saved in zip(self._buffers, self._saved):
            buffer.copy_(saved)
