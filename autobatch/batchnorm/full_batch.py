"""Full-batch statistics for micro-batches: phase 1 records them, phase 2 normalizes with them.

    handler = FullBatchStatistics(names, ranks)
    with torch.no_grad(), intercept_batch_norm(handler.record):
        model(whole_batch)                  # phase 1: full-batch statistics, running statistics once
    with intercept_batch_norm(handler.apply):
        for rows, part in micro_batches:    # phase 2: those statistics, the projected backward
            handler.start_micro_batch(rows)
            loss_fn(model(part), ...).backward()
            handler.finish_micro_batch()

Calls are matched between the passes by their order in the forward.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import Tensor

from autobatch.batchnorm.intercept import BatchNormCall
from autobatch.batchnorm.recompute import RecomputedCalls
from autobatch.batchnorm.rows import rows_per_sample
from autobatch.batchnorm.statistics import (
    LayerStatistics,
    channel_means,
    check_values_per_channel,
    full_batch_statistics,
    local_statistics,
    name_of,
    normalize,
    variance,
)
from autobatch.distributed import Ranks

log = logging.getLogger(__name__)

__all__ = ["FEW_VALUES_PER_CHANNEL", "FullBatchStatistics", "StopForward", "check_same_channels", "different_calls",
           "not_the_same_calls"]

_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # torch >= 2.3

#: A micro-batch layer with fewer values per channel than this gets a warning:
#: the projected backward takes its subtracted means from one micro-batch (see docs/limits.md).
FEW_VALUES_PER_CHANNEL = 32


class StopForward(BaseException):
    """Raised after the last BatchNorm call of phase 1: the rest of the forward is not needed.

    A BaseException, so that a model's own ``except Exception`` does not swallow it.
    """


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


#: How far (in the full batch's standard deviations) a micro-batch's BatchNorm input mean may lie
#: from phase 1's mean of the same samples before the step is refused: rounding, another memory
#: format or bf16 autocast move it far less than this (measured in docs/guide/batchnorm.md).
#: The rounding of the mean itself (a channel with a large mean and a tiny spread) is allowed on top.
REPLAY_TOLERANCE = {torch.float64: 1e-6, torch.float32: 0.02}
#: Half-precision inputs (autocast) round activations to 3 significant digits.
REPLAY_TOLERANCE_HALF = 0.1
#: Where a model's own rounding, measured against float64 (autobatch.batchnorm.rounding), passes those
#: allowances, this many times it is allowed instead: the micro-batch's and phase 1's forwards each round on
#: their own, about as far from the exact values as the one measured.
ROUNDING_MARGIN = 4.0


def _phase1_means(layer: LayerStatistics, rows: tuple[int, int]) -> Optional[Tensor]:
    """Phase 1's channel means of the samples ``rows`` of the logical batch; None where it has none."""
    start, stop = (row - layer.first_row for row in rows)
    if layer.sample_means is None or start < 0 or stop > len(layer.sample_means):
        return None
    return layer.sample_means[start:stop].mean(0)


def not_the_same_calls(what: str) -> RuntimeError:
    """The error for a micro-batch whose BatchNorm calls are not phase 1's; ``what`` says how they differ."""
    return RuntimeError(f"{what}; bn='two_pass' needs the same sequence of training-mode BatchNorm calls in every "
                        "forward of a batch. Use bn='micro' for models whose BatchNorm calls depend on the data.")


def different_calls(more: str, fewer: str, calls: int) -> RuntimeError:
    """The error for a forward that made more BatchNorm calls than the other (``calls``)."""
    return not_the_same_calls(f"the {more} forward made more training-mode BatchNorm calls than the {fewer} "
                              f"forward ({calls})")


def check_same_channels(micro: int, full: int, index: int, name: str) -> None:
    if micro != full:
        raise not_the_same_calls(f"BatchNorm call #{index} has {micro} channels in a micro-batch but {full} in the "
                                 f"full batch ({name!r})")


class FullBatchStatistics:
    """two_pass's BatchNorm handlers: full-batch statistics from a no-grad pass, then micro-batches that use them.

    ``record`` is phase 1's handler: it normalizes with the batch's statistics, updates the running
    statistics as nn.BatchNorm does for one full batch, and keeps mean and invstd. ``apply`` is
    phase 2's: the same outputs as the full batch, the projected backward, running statistics untouched.
    """

    def __init__(self, names: dict[int, str], ranks: Optional[Ranks] = None, stop_early: bool = True):
        self.names = names
        self.ranks = ranks or Ranks()
        self.layers: list[LayerStatistics] = []
        #: Number of calls seen in the last complete phase 1; phase 1 stops after that many.
        self.calls_per_forward: Optional[int] = None
        #: Whether phase 1 ends after its last BatchNorm call (not for a fully_shard model: to reshard).
        self.stop_early = stop_early
        self._cursor = 0
        self._samples: Optional[int] = None
        self._recomputed = RecomputedCalls()
        #: Per layer, phase 1's channel means of the running micro-batch's samples (None: unchecked),
        #: computed when it starts: the forward, perhaps traced by torch.compile, reads no row numbers.
        self._expected: list[Optional[Tensor]] = []
        #: (call index, how far its micro-batch mean lies from phase 1's for the same samples, tolerance):
        #: the running micro-batch's, which starts empty (torch.compile guards on the list's length),
        #: and the earlier ones of this step.
        self._deviations: list[tuple[int, Tensor, float]] = []
        self._checked: list[tuple[int, Tensor, float]] = []
        #: Per call index, the allowance the model's measured rounding sets (kept for the wrap's later steps).
        self.rounding: dict[int, float] = {}

    def start_phase1(self, samples: Optional[int] = None) -> None:
        """``samples``: the batch's, by which each layer's per-sample means are taken (None: by its input's rows)."""
        self.layers = []
        self._deviations, self._checked = [], []
        self._samples = samples

    def record(self, call: BatchNormCall) -> Tensor:
        name = name_of(call, self.names, len(self.layers))
        if self.ranks.active:
            output, layer = self._record_across_ranks(call, name)
        else:
            check_values_per_channel(call.values_per_channel, name)
            output, mean, invstd = torch.ops.aten.native_batch_norm(
                call.input, call.weight, call.bias, call.running_mean, call.running_var, True,
                call.momentum, call.eps)
            layer = LayerStatistics(name, mean, invstd, variance(invstd, call.eps), call.eps,
                                    call.values_per_channel)
        layer.sample_means = self._sample_means(call.input.detach(), layer.mean.dtype)
        self.layers.append(layer)
        self.stop_after_last_call()
        return output

    def _sample_means(self, input: Tensor, dtype: torch.dtype) -> Tensor:
        """Each sample's channel means (samples, C), for the micro-batches' check: an input with k rows per sample
        (tokens or frames folded into its first dimension, autobatch.batchnorm.rows) averages each sample's k."""
        means = channel_means(input, dtype, per_sample=True)
        per_sample = None if self._samples is None else rows_per_sample(len(means), self._samples)
        return means if per_sample in (None, 1) else means.view(self._samples, per_sample, -1).mean(1)

    def stop_after_last_call(self) -> None:
        """Ends phase 1's forward with `StopForward` once it has made every BatchNorm call.
        Not under torch.compile: dynamo would give up on the traced forward, and compile each call apart;
        nor where ``stop_early`` is off (a fully_shard model's forward must end to reshard its parameters)."""
        if self.stop_early and not _is_compiling() and len(self.layers) == self.calls_per_forward:
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

    def finish_phase1(self, complete: bool) -> None:
        """``complete``: the forward ran to its end, so the number of calls is known exactly."""
        if complete:
            self.calls_per_forward = len(self.layers)

    def start_micro_batch(self, rows: Optional[tuple[int, int]] = None) -> None:
        """``rows``: the samples of the logical batch that the micro-batch holds, checked against phase 1
        (None: a padding micro-batch, or none to check)."""
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
        statistics and projected backward of the forward call it repeats (see autobatch.batchnorm.recompute)."""
        index = self._recomputed.match(call, name_of(call, self.names, None))
        return self.project(call, self.layers[index], index)

    def project(self, call: BatchNormCall, layer: LayerStatistics, index: int, check: bool = False) -> Tensor:
        """``call``'s input normalized with ``layer``'s full-batch statistics, with the projected backward.
        ``check``: compare the micro-batch's mean with phase 1's for the same samples (see `check`)."""
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

    def check(self, rounding: Optional[Callable[[], list[float]]] = None) -> Optional[RuntimeError]:
        """The error for a step whose micro-batches fed a BatchNorm other inputs than phase 1 measured
        for the same samples; None if they agree. One device sync, for the whole step. ``rounding``: where
        a layer passes its allowance, the model's own rounding at each call, measured
        (autobatch.batchnorm.rounding): it raises the allowances (for this step and the later ones)
        before anything is refused, so that no run ends for rounding."""
        checked = self._checked + self._deviations
        if not checked:
            return None
        values = torch.stack([deviation for _, deviation, _ in checked]).tolist()
        over = self._over(checked, values)
        if over and rounding is not None:
            measured = rounding()
            for index, value in enumerate(measured):
                self.rounding[index] = max(self.rounding.get(index, 0.0), ROUNDING_MARGIN * value)
            if not self._over(checked, values):
                index, value, _ = over[0]
                log.info("autobatch: BatchNorm layer %r's micro-batch inputs lay %.3g standard deviations from phase "
                         "1's; the model's own rounding, measured against a float64 forward of the same samples, "
                         "explains it (%.3g allowed from now on)", self.layers[index].name, value,
                         self.rounding[index])
                return None
            over = self._over(checked, values)
        if over:
            index, value, tolerance = over[0]
            return RuntimeError(
                    f"BatchNorm layer {self.layers[index].name!r} got inputs in a micro-batch whose mean lies "
                    f"{value:.3g} standard deviations from phase 1's for the same samples (rounding allows "
                    f"{tolerance:.3g}{', measured against a float64 forward' if index in self.rounding else ''}); "
                    "bn='two_pass' needs each micro-batch's forward to repeat phase 1's. Likely "
                    "causes: a random operation autobatch does not replay (it replays dropout, stochastic depth "
                    "and torch's random functions), a layer whose output depends on the other samples of the batch, "
                    "or a model that pads each batch to its largest sample (torchvision's detection models), which pads "
                    "a micro-batch otherwise than the whole batch: give it inputs of one size. No optimizer step was "
                    "taken and the model is unchanged; use bn='micro' for this model.")
        return None

    def _over(self, checked: list[tuple[int, Tensor, float]], values: list[float]) -> list[tuple[int, float, float]]:
        """(call, deviation, allowance) of every check past its allowance: the dtype's, or the measured rounding."""
        allowed = [(index, value, max(tolerance, self.rounding.get(index, 0.0)))
                   for (index, _, tolerance), value in zip(checked, values)]
        return [entry for entry in allowed if entry[1] > entry[2]]

    def finish_micro_batch(self) -> None:
        if self._cursor != len(self.layers):
            raise not_the_same_calls(f"the micro-batch forward made {self._cursor} training-mode BatchNorm calls but "
                                     f"the full-batch forward made {len(self.layers)}")

    def thin_layers(self, smallest_split: int, batch: int) -> list[tuple[str, int]]:
        """Layers whose micro-batches hold fewer than FEW_VALUES_PER_CHANNEL values per channel."""
        thin = []
        for layer in self.layers:
            values = layer.values_per_channel * smallest_split // batch
            if values < FEW_VALUES_PER_CHANNEL:
                thin.append((layer.name, values))
        return thin
