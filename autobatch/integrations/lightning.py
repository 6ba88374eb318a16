"""autobatch in PyTorch Lightning: a callback under automatic optimization, or ``ab.step`` in manual optimization.

Automatic optimization, the LightningModule untouched (``training_step`` returns the loss)::

    trainer = L.Trainer(callbacks=[AutoBatchCallback(memory_budget="6GiB")])   # wrap's keywords
    trainer.fit(module, loader)             # every batch the loader yields: split into what fits

Each batch's gradient is the whole batch's, computed by ``ab.backward`` in micro-batches that fit;
Lightning takes the rest as without it: precision (bf16-mixed autocast, 16-mixed's GradScaler),
``accumulate_grad_batches``, gradient clipping, schedulers, logging, checkpoints, ``global_step``.
With several processes, add ``strategy=AutoBatchDDPStrategy()``.

Manual optimization, autobatch taking the step:

    class Segmenter(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False          # autobatch takes the optimizer step
            self.net = UNet()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            ab = autobatch.integrations.lightning.wrap(self, target_batch=64, loss_fn=criterion)
            self.log("train_loss", ab.step(*batch), prog_bar=True)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters())

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=AutoBatchDDPStrategy())   # or one device

Lightning's own DDP wraps the LightningModule and syncs gradients in the backward of each
``training_step``; autobatch runs several backward passes per step and syncs once per logical batch,
so ``AutoBatchDDPStrategy`` is Lightning's DDP strategy with DistributedDataParallel kept beside the
LightningModule (for autobatch) instead of around it. Everything else (launching, logging, the
progress bar, checkpoints, ``self.log(..., sync_dist=True)``) is Lightning's.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from autobatch.distributed import Ranks
from autobatch.forward import ForwardSwap
from autobatch.integrations import gradient_apart
from autobatch.options import Options
from autobatch.split import batch_format
from autobatch.step import AutoBatch
from autobatch.transaction import add_gradients

__all__ = ["AutoBatchCallback", "AutoBatchDDPStrategy", "LightningAutoBatch", "wrap"]


class AutoBatchDDPStrategy(DDPStrategy):
    """Lightning's DDP for a LightningModule that trains through autobatch (manual optimization)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        #: DistributedDataParallel around the LightningModule, for autobatch; Lightning calls the module itself.
        self.autobatch_model: Optional[DistributedDataParallel] = None

    def configure_ddp(self) -> None:
        self.autobatch_model = self._setup_model(self.model)

    def teardown(self) -> None:
        self.autobatch_model = None
        super().teardown()


class LightningAutoBatch(AutoBatch):
    """An AutoBatch whose optimizer steps Lightning counts (``trainer.global_step``, schedulers,
    ``max_steps``, checkpoint intervals), as it counts ``optimizer.step()`` in manual optimization."""

    def __init__(self, module: LightningModule, model: Any, optimizer: Any, options: Options):
        super().__init__(model, optimizer, options)
        self._module = module

    def step(self, inputs: Any, targets: Any = None) -> float:
        loss = super().step(inputs, targets)
        counted = self._module.optimizers()
        # The hooks Lightning's manual loop gives its optimizer wrapper for each step it takes.
        counted._on_before_step()
        counted._on_after_step()
        return loss


def _refuse_fsdp(strategy: Any) -> None:
    if isinstance(strategy, FSDPStrategy):
        raise TypeError("Lightning's FSDPStrategy shards with the FullyShardedDataParallel class, which autobatch "
                        "does not support: use AutoBatchDDPStrategy, or shard the module yourself with "
                        "torch.distributed.fsdp.fully_shard (FSDP2) and train it with autobatch.wrap")


def _optimizer(module: LightningModule) -> torch.optim.Optimizer:
    optimizer = module.optimizers()
    if isinstance(optimizer, list):
        raise TypeError(f"autobatch trains with one optimizer, and configure_optimizers returned {len(optimizer)}")
    return getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer holds the real one


def wrap(module: LightningModule, target_batch: int, loss_fn: Any = None, **options: Any) -> AutoBatch:
    """The module's AutoBatch (``options``: ``autobatch.wrap``'s keywords), made at its first call and kept on
    the module (not in its state_dict): over the strategy's DistributedDataParallel under
    `AutoBatchDDPStrategy`, else the module itself, with the optimizer of ``configure_optimizers``.
    ``target_batch``: over all processes.
    Lightning's precision plugin runs ``training_step`` under its autocast (bf16-mixed);
    16-mixed's GradScaler is the plugin's, and not supported here yet."""
    ab = module.__dict__.get("_autobatch")
    if ab is None:
        strategy = module.trainer.strategy
        _refuse_fsdp(strategy)
        if getattr(strategy.precision_plugin, "scaler", None) is not None:
            raise ValueError("ab.step under Lightning's precision='16-mixed' is not supported: Lightning's GradScaler "
                             "steps the optimizer itself. Use precision='bf16-mixed', or automatic optimization with "
                             "AutoBatchCallback, where Lightning's scaler steps as usual")
        model = getattr(strategy, "autobatch_model", None) or module
        optimizer = _optimizer(module)
        options.setdefault("device", module.device)
        built = Options.build(model, optimizer, target_batch, Ranks.of(model).world_size, loss_fn=loss_fn, **options)
        ab = LightningAutoBatch(module, model, optimizer, built)
        module.__dict__["_autobatch"] = ab
    return ab


class _Redirected(nn.Module):
    """A module whose forward is ``training_step``: what DistributedDataParallel around the LightningModule
    must call for each micro-batch, so that its reducer sees the forward of the backward that follows."""

    def __init__(self, module: LightningModule, training_step: Any):
        super().__init__()
        self.__dict__["_target"], self.__dict__["_training_step"] = module, training_step

    def __call__(self, model: nn.Module, batch: Any, batch_idx: int) -> Any:
        if model is self._target:
            return self._training_step(batch, batch_idx)

        def forward(*args: Any, **kwargs: Any) -> Any:
            # The real forward back before training_step runs: it calls self(x) itself.
            swap.restore()
            return self._training_step(*args, **kwargs)

        swap = ForwardSwap(self._target, forward)
        try:
            return model(batch, batch_idx)
        finally:
            swap.restore()


class _Logged:
    """What ``self.log`` received in each micro-batch's ``training_step``, logged once per batch instead: each
    value's mean over the batch's samples, as the whole batch's ``training_step`` would have logged it."""

    def __init__(self, module: LightningModule):
        self.module = module
        #: Per grad-enabled training_step call: its samples and its (name, value, keywords) logs.
        self.calls: list[tuple[int, list[tuple[str, Any, dict[str, Any]]]]] = []

    @contextlib.contextmanager
    def captured(self, samples: int) -> Iterator[None]:
        logs: list[tuple[str, Any, dict[str, Any]]] = []
        self.module.log = lambda name, value, **kwargs: logs.append((name, value, kwargs))
        try:
            yield
        finally:
            del self.module.log
        if torch.is_grad_enabled():  # not phase 1's no-grad forward of the whole batch
            self.calls.append((samples, logs))

    def log_batch(self, samples: int) -> None:
        """The last calls, whose samples make up the batch's (the planner's trials came before them), logged."""
        taken, counted = [], 0
        for n, logs in reversed(self.calls):
            if counted >= samples:
                break
            taken.append((n, logs))
            counted += n
        self.calls = []
        merged: dict[str, tuple[float, int, Any, dict[str, Any]]] = {}
        for n, logs in taken:
            for name, value, kwargs in logs:
                number = float(value.detach().double().mean()) if isinstance(value, torch.Tensor) else float(value)
                total, seen, _, _ = merged.get(name, (0.0, 0, value, kwargs))
                merged[name] = (total + number * n, seen + n, value, kwargs)
        for name, (total, seen, like, kwargs) in merged.items():
            mean = total / seen
            # As the value was logged: a tensor keeps its dtype and device (float64 stays float64).
            value = torch.tensor(mean, dtype=like.dtype, device=like.device) if isinstance(like, torch.Tensor) else mean
            self.module.log(name, value, **{"batch_size": samples, **kwargs})


class AutoBatchCallback(Callback):
    """Every training batch's gradient in micro-batches that fit, under Lightning's automatic optimization.

    Add it to the Trainer, with `autobatch.wrap`'s keywords (``micro_batch``, ``memory_budget``, ``bn``,
    ``cache``...); the LightningModule stays as it is.

    The batch the loader yields is the logical batch (``target_batch``: its size by default, times the
    processes). Its ``training_step`` runs once per micro-batch inside ``ab.backward``, which leaves the whole
    batch's gradient (divided by ``accumulate_grad_batches`` as Lightning divides the loss, and scaled by
    16-mixed's GradScaler) and holds it until Lightning's backward, which then adds it to ``.grad`` (Lightning
    clears gradients in between); ``training_step`` returns that batch's loss, over every process. A
    ``backward`` hook of the module's own is not called. ``self.log`` values are logged once per batch, their
    mean over its samples. With several processes use ``strategy=AutoBatchDDPStrategy()``: Lightning's own DDP
    would synchronize the gradient at every micro-batch. The module's ``training_step`` and ``backward`` are
    restored when fitting ends.

    Example:
        ```python
        trainer = L.Trainer(
            precision="bf16-mixed", accumulate_grad_batches=2, gradient_clip_val=1.0,
            callbacks=[AutoBatchCallback(bn="two_pass")],
        )
        ```
    """

    def __init__(self, target_batch: Optional[int] = None, **options: Any):
        self.target_batch = target_batch
        self.options = options
        #: The AutoBatch of the fit, made at its first batch.
        self.autobatch: Optional[AutoBatch] = None
        self._module: Optional[LightningModule] = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("AutoBatchCallback computes each batch's gradient under automatic optimization; with "
                             "self.automatic_optimization = False call autobatch.integrations.lightning.wrap(self, ...)"
                             ".step(...) in training_step instead, and drop the callback")
        _refuse_fsdp(trainer.strategy)
        if isinstance(trainer.strategy, DDPStrategy) and not isinstance(trainer.strategy, AutoBatchDDPStrategy):
            raise ValueError("under several processes AutoBatchCallback needs strategy=AutoBatchDDPStrategy(): "
                             "Lightning's own DDP would synchronize the gradient in every micro-batch's backward")
        logged, redirected = _Logged(pl_module), _Redirected(pl_module, pl_module.training_step)
        step: dict[str, Any] = {}

        def compute_loss(model: nn.Module, micro: Any) -> Any:
            with logged.captured(self.autobatch.options.batches.size(micro)):
                output = redirected(model, micro, step["batch_idx"])
            step["output"] = output
            loss = output["loss"] if isinstance(output, dict) else output
            return loss / trainer.accumulate_grad_batches  # as Lightning divides the loss it back-propagates

        held: list[tuple[nn.Parameter, Optional[torch.Tensor]]] = []

        def training_step(batch: Any, batch_idx: int, *args: Any) -> Any:
            ab = self._wrapped(trainer, pl_module, batch, compute_loss)
            step["batch_idx"] = batch_idx
            # Lightning clears gradients between training_step and backward: the batch's waits until then.
            mean, held[:] = gradient_apart(ab, ab._micro.parameters(), batch)
            mean *= trainer.accumulate_grad_batches
            logged.log_batch(ab.options.batches.size(batch))
            # Lightning back-propagates this leaf, which reaches no parameter; backward below adds the batch's.
            loss = torch.tensor(mean, device=pl_module.device, requires_grad=True)
            output = step.pop("output")
            return {**output, "loss": loss} if isinstance(output, dict) else loss

        def backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            add_gradients(held)
            held.clear()

        pl_module.training_step = training_step
        pl_module.backward = backward
        self._module = pl_module

    def _wrapped(self, trainer: Trainer, module: LightningModule, batch: Any, compute_loss: Any) -> AutoBatch:
        if self.autobatch is None:
            strategy = trainer.strategy
            model = getattr(strategy, "autobatch_model", None) or module
            ranks = Ranks.of(model)
            options = dict(self.options)
            options.setdefault("device", module.device)
            scaler = getattr(strategy.precision_plugin, "scaler", None)
            if scaler is not None:
                options.setdefault("scaler", scaler)  # 16-mixed: the gradient scaled by Lightning's own scaler
            batches = batch_format(options.get("num_samples"), options.get("split_batch"))
            target = self.target_batch or batches.size(batch) * ranks.world_size
            built = Options.build(model, _optimizer(module), target, ranks.world_size, compute_loss=compute_loss,
                                  **options)
            self.autobatch = AutoBatch(model, _optimizer(module), built)
        return self.autobatch

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._module is not None:
            self._module.__dict__.pop("training_step", None)
            self._module.__dict__.pop("backward", None)
            self._module = None
