"""autobatch in PyTorch Lightning: manual optimization, ``ab.step`` inside ``training_step``.

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

from typing import Any, Optional

from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch.nn.parallel import DistributedDataParallel

from autobatch.distributed import Ranks
from autobatch.options import Options
from autobatch.step import AutoBatch

__all__ = ["AutoBatchDDPStrategy", "LightningAutoBatch", "wrap"]


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


def wrap(module: LightningModule, target_batch: int, loss_fn: Any = None, **options: Any) -> AutoBatch:
    """The module's AutoBatch (``options``: ``autobatch.wrap``'s keywords), made at its first call and kept on
    the module (not in its state_dict): over the strategy's DistributedDataParallel under
    :class:`AutoBatchDDPStrategy`, else the module itself, with the optimizer of ``configure_optimizers``.
    ``target_batch``: over all processes.
    Lightning's precision plugin runs ``training_step`` under its autocast (bf16-mixed);
    16-mixed's GradScaler is the plugin's, and not supported here yet."""
    ab = module.__dict__.get("_autobatch")
    if ab is None:
        strategy = module.trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            raise TypeError("Lightning's FSDPStrategy shards with the FullyShardedDataParallel class, which autobatch "
                            "does not support: use AutoBatchDDPStrategy, or shard the module yourself with "
                            "torch.distributed.fsdp.fully_shard (FSDP2) and train it with autobatch.wrap")
        if getattr(strategy.precision_plugin, "scaler", None) is not None:
            raise ValueError("autobatch under Lightning's precision='16-mixed' is not supported yet: Lightning's "
                             "GradScaler steps the optimizer itself. Use precision='bf16-mixed'")
        model = getattr(strategy, "autobatch_model", None) or module
        optimizer = module.optimizers()
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer holds the real one
        options.setdefault("device", module.device)
        built = Options.build(model, optimizer, target_batch, Ranks.of(model).world_size, loss_fn=loss_fn, **options)
        ab = LightningAutoBatch(module, model, optimizer, built)
        module.__dict__["_autobatch"] = ab
    return ab
