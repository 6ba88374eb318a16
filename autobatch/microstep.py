"""The model-facing part of a step, shared by training and the planner's trials: forward, loss,
backward and the optimizer's update, under the user's autocast, GradScaler and clipping.

    micro = MicroStep(model, optimizer, Options.build(model, optimizer, 16, loss_fn=criterion))
    micro.backward(micro.loss(part, index=0).value * len(part[0]) / 16)
    micro.update(micro.parameters())            # all or nothing; out of memory there: the update again
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager, Optional, Union

import torch
from torch import Tensor, nn

from autobatch.distributed import Ranks, ddp_of, fsdp_of
from autobatch.loss import LossValue, read_loss
from autobatch.once import Once
from autobatch.oom import first_line, is_out_of_memory, release_memory
from autobatch.options import Options, UpdateCopies
from autobatch.stages import Stage, entered, tag
from autobatch.transaction import trial_transaction, undo_copy_bytes, update_transaction, warm_optimizer_state

__all__ = ["ComputeLoss", "LossFn", "MicroStep"]

#: A loss returns its micro-batch's mean, or ``(loss_sum, count)`` (autobatch.loss).
LossFn = Callable[[Any, Any], Union[Tensor, tuple[Tensor, Any]]]
ComputeLoss = Callable[[nn.Module, Any], Union[Tensor, tuple[Tensor, Any]]]


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


class MicroStep:
    """A model, its optimizer and how one micro-batch trains (``options``: autobatch.options):
    ``loss_fn(model(inputs), targets)`` or ``compute_loss(model, micro_batch)``, backward (scaled by
    the scaler), and the update (unscale, clip to ``max_grad_norm``, ``before_step()``,
    ``optimizer.step()``). ``before_step``: the user's hook, bound to its AutoBatch."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, options: Options,
                 before_step: Optional[Callable[[], None]] = None):
        self.model = model
        ddp = ddp_of(model)
        #: The module itself: trials and phase 1 bypass DistributedDataParallel (no gradient to sync).
        #: A fully_shard (FSDP2) model is its own module: its forward gathers the shards from every rank.
        self.module = model if ddp is None else ddp.module
        self.ddp = ddp
        self.fsdp = fsdp_of(model)
        self.ranks = Ranks.of(model)
        #: This rank's samples of a full logical batch: the one place it is computed.
        self.share = options.target_batch // self.ranks.world_size
        #: Whether the model's forward and backward are collectives over the ranks (fully_shard gathers
        #: shards from every rank): then every rank must run them, trials too, at the same time.
        self.collective = self.fsdp is not None and self.ranks.active
        self.optimizer = optimizer
        self.loss_fn = options.loss_fn
        self.compute_loss = options.compute_loss
        self.scaler = options.scaler
        self.autocast_dtype = options.autocast_dtype
        self.max_grad_norm = options.max_grad_norm
        self.before_step = before_step
        self.device = options.device if options.device is not None else _model_device(model)
        #: Where the update's undo copies live (autobatch.transaction).
        self.update_copies: UpdateCopies = options.update_copies
        #: How batches are counted, cut and moved (autobatch.split).
        self.batches = options.batches
        #: Whether the update changes the gradients in place (unscaling, clipping, the user's hook): its
        #: undo copies then keep them too, so that the update alone can be taken again.
        self.update_changes_gradients = (self.scaler is not None or self.max_grad_norm is not None
                                         or before_step is not None)
        #: What this wrap has said or checked once (its warnings, the running-statistics watch).
        self.once = Once()
        #: The undo copies' bytes an update taken and undone found, before the first real update.
        self._trial_copy_bytes = 0

    def autocast(self) -> ContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def parameters(self) -> list[nn.Parameter]:
        """The optimizer's parameters, then the model's others, each once."""
        seen: dict[int, nn.Parameter] = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                seen.setdefault(id(p), p)
        for p in self.model.parameters():
            seen.setdefault(id(p), p)
        return list(seen.values())

    def loss(self, part: Any, index: int, model: Optional[nn.Module] = None) -> LossValue:
        """The micro-batch's loss as the user's function returns it, checked (``model``: the wrapped one):
        its mean, or ``(loss_sum, count)`` (autobatch.loss)."""
        model = self.model if model is None else model
        with self.autocast():
            if self.compute_loss is not None:
                result = self.compute_loss(model, part)
            else:
                result = self.loss_fn(model(part[0]), part[1])
        return read_loss(result, index)

    def forward(self, batch: Any) -> None:
        """The module's forward alone, output unused (phase 1; autocast is the caller's)."""
        if self.compute_loss is not None:
            self.compute_loss(self.module, batch)
        else:
            self.module(batch[0])

    def backward(self, loss: Tensor) -> None:
        if not loss.requires_grad:
            raise RuntimeError("the loss does not require grad: it depends on no parameter that requires grad (was it "
                               "computed under torch.no_grad(), detached, or converted with .item()?); return the loss "
                               "tensor as the model computed it. No optimizer step was taken and the model is unchanged")
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def update(self, params: list[nn.Parameter]) -> None:
        """Clip, ``before_step`` and one optimizer step, all or nothing: an error anywhere, on this
        rank or another (out of memory half-way through the optimizer's in-place update included),
        leaves parameters, optimizer state, scaler and gradients as before (autobatch.transaction).
        Out of memory there takes the update once more, on every rank, with its copies on the host:
        the gradients are complete, and a smaller micro-batch would not make the update smaller."""
        self.check_finite_gradient(params)
        with entered(Stage.UPDATE):
            message = self._attempt(params, self.update_copies)
            if message is None:
                return
            release_memory(self.device)
            message = self._attempt(params, "host")
            if message is not None:
                raise tag(MemoryError(
                    f"out of memory inside the optimizer update ({message}), also with its undo copies in host "
                    "memory; the step was put back. The update needs the memory the micro-batches' activations "
                    "leave free: give it more headroom (a smaller memory_budget), or a smaller optimizer state"),
                    Stage.UPDATE)

    def _attempt(self, params: list[nn.Parameter], copies: UpdateCopies) -> Optional[str]:
        """One try of the update; None if it was taken, else why it ran out of memory (put back, to be
        tried again). Any other error is raised, the update put back."""
        try:
            with update_transaction(params, self.optimizer, self.scaler, copies, self.update_changes_gradients):
                try:
                    self._update(params)
                    error: Optional[BaseException] = None
                except BaseException as caught:
                    error = self._unrecoverable(caught, copies)
                    if not self.ranks.active:
                        if error is caught:
                            raise
                        raise error from caught
                if self.ranks.active:
                    # A rank whose update failed is put back; so is every other, or the replicas would part.
                    _, failure = self.ranks.outcome(error)
                    if failure is not None:
                        raise failure
            return None
        except BaseException as error:
            if copies == "none" or not is_out_of_memory(error):
                raise
            return first_line(error)

    def memory_stop(self, budget_bytes: Optional[int]) -> Optional[int]:
        """Where a measured step or trial on the host is stopped, out of memory (autobatch.planning.measure):
        the budget, but never inside a fully_shard model's forward, which would keep its parameters gathered."""
        return None if self.collective else budget_bytes

    def undo_copy_bytes(self) -> int:
        """Device bytes of the update's undo copies (``update_copies``): 0 where there are none or they live in
        host memory apart from the device's. Before the first update, as large as a trial's update found them
        (the optimizer's state, Adam's moments say, exists from the first update on)."""
        if self.update_copies == "none" or (self.update_copies == "host" and self.device.type != "cpu"):
            return 0
        if not self._trial_copy_bytes and not self.ranks.active and \
                not any(self.optimizer.state.get(p) for p in self.parameters()):
            # No update yet (a plan from the cache): one taken and undone, to see the state it creates.
            with trial_transaction(self.model, self.optimizer):
                warm_optimizer_state(self.optimizer)
                self._trial_copy_bytes = undo_copy_bytes(self.parameters(), self.optimizer,
                                                         self.update_changes_gradients)
        return max(self._trial_copy_bytes,
                   undo_copy_bytes(self.parameters(), self.optimizer, self.update_changes_gradients))

    def trial_update(self) -> None:
        """The update as the planner's trials measure it: the same copies and ``optimizer.step()``."""
        with update_transaction(self.parameters(), self.optimizer, copies=self.update_copies,
                             gradients=self.update_changes_gradients):
            self.optimizer.step()

    def _unrecoverable(self, error: BaseException, copies: UpdateCopies) -> BaseException:
        """Without copies an update that ran out of memory may be half applied: taking it again would
        apply it twice, so it is not an out-of-memory error to recover from any more."""
        if copies != "none" or not is_out_of_memory(error):
            return error
        return RuntimeError(
            f"out of memory inside the optimizer update ({first_line(error)}); with update_copies='none' it may be "
            "partly applied and autobatch does not take it again. Leave more headroom (a smaller memory_budget), "
            "or let autobatch keep copies to undo it (update_copies='host' costs no device memory)")

    def _update(self, params: list[nn.Parameter]) -> None:
        if self.scaler is not None and self.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if self.before_step is not None:
            self.before_step()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self._check_finite_update(params)

    @staticmethod
    def _check_finite_update(params: list[nn.Parameter]) -> None:
        """An update that made a parameter NaN or infinite is put back (the caller's transaction) and reported,
        as a non-finite gradient is: one norm over the updated parameters, one device sync."""
        updated = [getattr(p, "_local_tensor", p).detach() for p in params if p.grad is not None]
        if not updated:
            return
        norms = torch._foreach_norm(updated)
        finite = torch.stack([n.to(norms[0].device, torch.float32) for n in norms]).isfinite()
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise FloatingPointError(
                f"the optimizer's update made {bad} parameter tensor(s) NaN or infinite although the gradient was "
                "finite; the update was put back, no step was taken and the model is unchanged. Lower the learning "
                "rate, or check the optimizer's settings (eps, weight decay)")

    def check_finite_gradient(self, params: list[nn.Parameter]) -> None:
        """A gradient that is not finite never reaches the optimizer (a GradScaler skips such steps itself)."""
        # A sharded (DTensor) gradient's own shard: FSDP2's ranks each hold another, so they agree below.
        grads = [getattr(p.grad, "_local_tensor", p.grad) for p in params if p.grad is not None]
        if self.scaler is not None or not grads:
            return
        # Half-precision norms in float32: a large finite fp16 gradient must not read as overflow.
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32 if g.element_size() < 4 else None)
                 .to(grads[0].device, torch.float64) for g in grads]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        if self.collective:
            norm = self.ranks.gather([norm.item()])[:, 0].square().sum().sqrt()
        if not math.isfinite(norm.item()):
            raise FloatingPointError(
                f"the accumulated gradient of the logical batch has norm {norm.item()} although every loss is "
                "finite; no optimizer step was taken and the model is unchanged. Lower the learning rate, or "
                "look for an operation whose gradient overflows")
