"""bn="exact": the whole logical batch in one forward and one backward, made to fit by activation
checkpointing; BatchNorm is then the full batch's by construction. Under DistributedDataParallel
each layer's forward statistics and the two sums of its backward are reduced over ranks, as
SyncBatchNorm does, so the step is the global batch's.

    exact = ExactStrategy(layers, names, ranks, micro)
    exact.checkpointing = Checkpointing(("layer1", "layer2"))     # chosen by the planner
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from autobatch.batchnorm.intercept import BatchNormCall, intercept_batch_norm
from autobatch.batchnorm.statistics import full_batch_statistics, local_statistics, name_of, normalize
from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.checkpointing import Checkpointing
from autobatch.distributed import Ranks
from autobatch.microstep import MicroStep
from autobatch.modes import Exact, Pieces
from autobatch.plan import Plan
from autobatch.transaction import BatchNormState

__all__ = ["ExactStrategy", "running_statistics_kept"]


class _GlobalBatchNorm(torch.autograd.Function):
    """Normalize with statistics over every rank; backward with the two sums over every rank:
    the input gradient of one BatchNorm over the global batch (SyncBatchNorm's, on any device)."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                invstd: Tensor, var: Tensor, eps: float, count: float, ranks: Ranks) -> Tensor:
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.count, ctx.ranks = count, ranks
        return torch.batch_norm(input, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, weight, mean, invstd = ctx.saved_tensors
        shape = (1, -1) + (1,) * (input.dim() - 2)
        dims = [0] + list(range(2, input.dim()))
        centred = input - mean.view(shape).to(input.dtype)
        sum_dy = grad_output.sum(dims, dtype=mean.dtype)
        sum_dy_xmu = (grad_output * centred).sum(dims, dtype=mean.dtype)
        sums = ctx.ranks.sum(torch.cat([sum_dy, sum_dy_xmu]))
        mean_dy, mean_dy_xmu = (sums / ctx.count).chunk(2)
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        grad_input = ((grad_output - mean_dy.view(shape).to(input.dtype)
                       - centred * (invstd.square() * mean_dy_xmu).view(shape).to(input.dtype))
                      * scale.view(shape).to(input.dtype))
        # Each rank's own share: DistributedDataParallel reduces the parameters' gradients itself.
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(grad_output.dtype) if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class GlobalStatistics:
    """BatchNorm over every rank's samples at once. ``contributes`` False: this rank's batch is a padding
    sample at weight 0, left out of the statistics."""

    def __init__(self, names: dict[int, str], ranks: Ranks):
        self.names = names
        self.ranks = ranks
        self.contributes = True

    def forward(self, call: BatchNormCall) -> Tensor:
        with torch.no_grad():
            mean, var = local_statistics(call.input.detach(), call.eps)
            count = call.values_per_channel if self.contributes else 0
            if not self.contributes:
                mean = torch.zeros_like(mean)
            layer = full_batch_statistics(self.ranks, name_of(call, self.names, None), call.eps, call.running_mean,
                                          call.running_var, call.momentum, count, mean, var * count)
        if not torch.is_grad_enabled():
            return normalize(call, layer)
        return _GlobalBatchNorm.apply(call.input, call.weight, call.bias, layer.mean, layer.invstd, layer.var,
                                      layer.eps, float(layer.values_per_channel), self.ranks)


@contextlib.contextmanager
def running_statistics_kept(layers: list[_BatchNorm]) -> Iterator[None]:
    """BatchNorm buffers as they are now, after the block: checkpointing's recomputation during
    backward repeats the forward's BatchNorm calls, update included, operation for operation (as
    selective checkpointing requires), and the forward's update is the one that counts."""
    state = BatchNormState(layers)
    try:
        yield
    finally:
        state.restore()


class ExactStrategy(BatchNormStrategy):
    """bn="exact": one forward and one backward of the (per-rank) logical batch, with ``checkpointing``."""

    name = Exact.name
    gradient = "exact: the whole batch in one piece"

    def __init__(self, layers: list[_BatchNorm], names: dict[int, str], ranks: Ranks, micro: MicroStep):
        super().__init__(layers, names, ranks)
        self.micro = micro
        #: The submodules checkpointed during a step; the planner sets it.
        self.checkpointing = Checkpointing()
        self._global = GlobalStatistics(names, ranks)

    @property
    def pieces(self) -> Pieces:
        return Pieces.WHOLE_BATCH

    def adopt(self, plan: Plan) -> None:
        self.checkpointing = plan.checkpointing

    def for_step(self, splits: list[int], chunks: int = 1) -> BatchNormStrategy:
        if len(splits) != 1:
            raise RuntimeError(f"bn='exact' runs the logical batch in one piece, not in {len(splits)} "
                               "micro-batches; leave micro_batch='auto'")
        return self

    def intercept(self) -> ContextManager[None]:
        stack = contextlib.ExitStack()
        stack.enter_context(self.checkpointing.applied(self.micro.module))
        if self.ranks.active:
            stack.enter_context(intercept_batch_norm(self._global.forward))
        return stack

    @contextlib.contextmanager
    def micro_batch(self, index: int, first_row: int, size: int) -> Iterator[None]:
        self._global.contributes = size > 0
        yield

    def backward(self, first_row: int, size: int) -> ContextManager[None]:
        return running_statistics_kept(self.layers)
