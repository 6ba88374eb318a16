"""torch.distributed for autobatch: ranks that agree, and BatchNorm statistics over all of them.

    ranks = Ranks.of(model)                  # world_size 1 unless model is DDP or fully_shard (FSDP2)
    table = ranks.gather([size, flag])       # (world_size, 2): every rank's values, on every rank
    table, failure = ranks.outcome(error, loss)   # failure: what to raise here if any rank failed
    count, mean, m2 = ranks.merge(count, mean, m2)   # per-channel statistics of all ranks together
    reason = ranks.first_reason(reason)      # the lowest rank's reason, or None: every rank decides alike
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.modules.batchnorm import _BatchNorm

from autobatch.forward import forwards_replaced
from autobatch.oom import first_line, is_out_of_memory

__all__ = ["RankFailure", "Ranks", "average_gradients", "check_not_legacy_fsdp", "ddp_of", "ddp_state", "fsdp_of",
           "fsdp_state", "gradient_sync", "plain_sync_batch_norm"]


class RankFailure(RuntimeError):
    """Another rank failed during a step; every rank raises, none is left waiting."""


def ddp_of(model: nn.Module) -> Optional[nn.parallel.DistributedDataParallel]:
    """``model`` if it is DistributedDataParallel, the one inside if torch.compile wrapped it, else None."""
    while not isinstance(model, nn.parallel.DistributedDataParallel):
        model = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(model, nn.Module):
            return None
    return model


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule


def fsdp_of(model: nn.Module) -> Optional[nn.Module]:
    """``model`` (inside torch.compile's wrapper) if ``fully_shard`` (FSDP2) sharded it, else None."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 has it under _composable; autobatch then sees plain modules
        return None
    model = _unwrapped(model)
    return model if isinstance(model, FSDPModule) else None


def check_not_legacy_fsdp(model: nn.Module) -> None:
    """The older FullyShardedDataParallel class is refused: its module is flattened and its gradient
    accumulation (no_sync) keeps unsharded gradients of every parameter."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return
    if any(isinstance(module, FullyShardedDataParallel) for module in _unwrapped(model).modules()):
        raise TypeError("autobatch supports FSDP through fully_shard (FSDP2), not the FullyShardedDataParallel "
                        "class: shard the model with torch.distributed.fsdp.fully_shard(module) for each block "
                        "and the root, then wrap it")


class Ranks:
    """The processes a DistributedDataParallel or fully_shard (FSDP2) model trains on (one otherwise)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, active: bool = False):
        self.group = group
        self.active = active and dist.get_world_size(group) > 1
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.rank = dist.get_rank(group) if self.active else 0
        backend = dist.get_backend(group) if self.active else "gloo"
        self.device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                       else torch.device("cpu"))

    @classmethod
    def of(cls, model: nn.Module) -> "Ranks":
        ddp = ddp_of(model)
        if ddp is not None:
            return cls(ddp.process_group, active=True)
        if fsdp_of(model) is not None and dist.is_available() and dist.is_initialized():
            return cls(None, active=True)  # FSDP2 shards over the default group's ranks (a 1-D mesh)
        return cls()

    def _all_gather(self, local: Tensor, what: str) -> Tensor:
        """Every rank's ``local`` (same shape on all ranks), stacked; backend errors become RankFailure."""
        table = [torch.empty_like(local) for _ in range(self.world_size)]
        try:
            dist.all_gather(table, local, group=self.group)
        except Exception as error:  # noqa: BLE001 - any backend error becomes one clear message
            raise RankFailure(f"rank {self.rank}: {what} with the other ranks failed ({error}); another rank "
                              "probably died, or took longer than the process group's timeout") from error
        return torch.stack(table)

    def gather(self, values: Sequence[float]) -> Tensor:
        """Every rank's ``values``, stacked: a (world_size, len(values)) float64 tensor."""
        local = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        if not self.active:
            return local.unsqueeze(0).cpu()
        return self._all_gather(local, "exchanging step status").cpu()

    def gather_messages(self, message: str) -> list[str]:
        """Every rank's ``message``, as bytes in tensors (all_gather_object would need NumPy)."""
        if not self.active:
            return [message]
        data = torch.tensor(list(message.encode()), dtype=torch.uint8, device=self.device)
        lengths = self.gather([len(data)])[:, 0].long().tolist()
        padded = torch.zeros(max(lengths), dtype=torch.uint8, device=self.device)
        padded[:len(data)] = data
        table = self._all_gather(padded, "exchanging messages")
        return [bytes(row[:n].tolist()).decode(errors="replace") for row, n in zip(table, lengths)]

    def outcome(self, error: Optional[BaseException], *values: float) -> tuple[Tensor, Optional[BaseException]]:
        """Every rank's (failed, out of memory, *values), and what this rank must raise if any failed:
        its own error where it failed, elsewhere an out-of-memory error if every failure was one (every
        rank then shrinks and redoes the same logical batch together), else RankFailure. One device sync."""
        table = self.gather([error is not None, error is not None and is_out_of_memory(error), *values])
        failed = [rank for rank in range(self.world_size) if table[rank, 0]]
        if not failed:
            return table, None
        messages = self.gather_messages("" if error is None else first_line(error))
        if error is not None:
            return table, error
        if all(table[rank, 1] for rank in failed):
            return table, torch.OutOfMemoryError(f"rank {failed[0]} ran out of memory: {messages[failed[0]]}")
        return table, RankFailure(f"rank {failed[0]} failed in this step: {messages[failed[0]]}")

    def first_reason(self, reason: Optional[str]) -> Optional[str]:
        """The lowest rank's ``reason`` where any rank has one, None where none has: every rank decides alike.
        One all-gather; two more, for the words, where a rank has one."""
        if not self.active:
            return reason
        table = self.gather([reason is not None])
        having = [rank for rank in range(self.world_size) if table[rank, 0]]
        if not having:
            return None
        words = self.gather_messages(reason or "")[having[0]]
        return words if having[0] == self.rank else f"on rank {having[0]}, {words}"

    def sum(self, local: Tensor) -> Tensor:
        """``local`` summed over every rank, in rank order (the same rounding on every rank)."""
        if not self.active:
            return local
        return self._all_gather(local.to(self.device), "summing BatchNorm gradients").sum(0).to(local.device)

    def merge(self, count: float, mean: Tensor, m2: Tensor) -> tuple[float, Tensor, Tensor]:
        """Chan's parallel merge of per-channel (count, mean, sum of squared deviations) over ranks."""
        if not self.active:
            return count, mean, m2
        channels = mean.numel()
        local = torch.cat([mean.new_tensor([count]), mean.reshape(-1), m2.reshape(-1)]).to(self.device)
        stacked = self._all_gather(local, "merging BatchNorm statistics").to(mean.device)
        counts, means, m2s = stacked[:, :1], stacked[:, 1:1 + channels], stacked[:, 1 + channels:]
        total = counts.sum()
        merged_mean = (counts * means).sum(0) / total
        merged_m2 = m2s.sum(0) + (counts * (means - merged_mean).square()).sum(0)
        return float(total), merged_mean.view_as(mean), merged_m2.view_as(m2)


def plain_sync_batch_norm(modules: list[_BatchNorm]) -> ContextManager[None]:
    """Run SyncBatchNorm layers through nn.BatchNorm's forward (which calls F.batch_norm, where
    autobatch merges statistics over ranks itself); their own forward is restored on exit."""
    synced = [m for m in modules if isinstance(m, nn.SyncBatchNorm) and "forward" not in vars(m)]
    return forwards_replaced((module, _BatchNorm.forward.__get__(module)) for module in synced)


@contextlib.contextmanager
def ddp_state(model: Optional[nn.parallel.DistributedDataParallel]) -> Iterator[None]:
    """Puts a DistributedDataParallel model back in step with the other ranks after a failed attempt.

    Every rank leaves a failed step together (they agree on it), but not from the same place: a rank
    that ran its last, synchronizing forward has a reducer waiting for that forward's backward, and
    would all-reduce in the next backward, which the other ranks run under no_sync. The forward also
    set the flag that makes the next forward broadcast buffers. Both are put back on every rank.
    """
    if model is None:
        yield
        return
    forward_sync = model.require_forward_param_sync
    try:
        yield
    except BaseException:
        model.require_forward_param_sync = forward_sync
        reset = getattr(model.reducer, "_reset_state", None)  # torch >= 2.2; DDP's own _update_process_group uses it
        if reset is not None:
            reset()
            model._has_rebuilt_buckets = False
        raise


@contextlib.contextmanager
def fsdp_state(model: Optional[nn.Module]) -> Iterator[None]:
    """Puts a fully_shard (FSDP2) model back after a failed attempt: the unsharded gradients that the
    micro-batches before the failure accumulated without reducing them are dropped (the attempt's
    gradient is taken again from the start), and every module's parameters resharded."""
    if model is None:
        yield
        return
    try:
        yield
    except BaseException:
        for module in model.modules():
            state = getattr(module, "_get_fsdp_state", lambda: None)()
            group = getattr(state, "_fsdp_param_group", None)
            for param in getattr(group, "fsdp_params", ()):  # private: FSDP2 has no API to drop them
                param.unsharded_accumulated_grad = None
                if hasattr(param, "_unsharded_param"):
                    param._unsharded_param.grad = None
            if hasattr(module, "reshard"):
                module.reshard()
        raise


def average_gradients(ddp: nn.parallel.DistributedDataParallel) -> None:
    """What DDP's reducer does in a synchronized backward, for gradients computed where it did not see them
    (precise's segment backward runs the module's captured graph, beside DDP's forward): each parameter's
    gradient averaged over the process group's ranks, one all-reduce per dtype and device. Every rank holds a
    gradient for the same parameters (the same graph ran on each)."""
    grads = [p.grad for p in ddp.parameters() if p.requires_grad and p.grad is not None]
    world_size = dist.get_world_size(ddp.process_group)
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for grad in grads:
        groups.setdefault((grad.device, grad.dtype), []).append(grad)
    for group in groups.values():
        flat = _flatten_dense_tensors(group).div_(world_size)  # DDP divides before it sums, as here
        dist.all_reduce(flat, group=ddp.process_group)
        for grad, averaged in zip(group, _unflatten_dense_tensors(flat, group)):
            grad.copy_(averaged)


@contextlib.contextmanager
def gradient_sync(ddp: Optional[nn.parallel.DistributedDataParallel], fsdp: Optional[nn.Module],
                  last: bool) -> Iterator[None]:
    """Gradients reduced over ranks once per logical batch, in the last micro-batch's backward: DDP's
    ``no_sync`` before it; FSDP2's ``set_requires_gradient_sync(False)`` and ``set_is_last_backward(False)``
    before it (the unsharded gradients accumulate, then are reduce-scattered once)."""
    if last or (ddp is None and fsdp is None):
        yield
    elif ddp is not None:
        with ddp.no_sync():
            yield
    else:
        fsdp.set_requires_gradient_sync(False)
        fsdp.set_is_last_backward(False)
        try:
            yield
        finally:
            fsdp.set_requires_gradient_sync(True)
            fsdp.set_is_last_backward(True)
