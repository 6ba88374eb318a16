"""Run by tests/test_integrations.py: Lightning's Trainer trains through autobatch, on one device or
with AutoBatchDDPStrategy on 2 CPU processes (Lightning launches the second), and saves the result."""
import os
import sys

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autobatch.integrations.lightning
from autobatch.integrations.lightning import AutoBatchCallback, AutoBatchDDPStrategy
from tests.distributed_worker import data, resnet

ce = nn.CrossEntropyLoss()


class Classifier(L.LightningModule):
    def __init__(self, bn):
        super().__init__()
        self.automatic_optimization = False
        self.net = resnet()
        self.bn = bn
        self.losses = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        options = dict(micro_batch=4) if self.bn == "two_pass" else dict(memory_budget=10**10)
        ab = autobatch.integrations.lightning.wrap(self, 16, ce, bn=self.bn, cache=False, **options)
        loss = ab.step(*batch)
        self.losses.append(loss)
        self.log("train_loss", loss, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Automatic(L.LightningModule):
    """A LightningModule as users write it for automatic optimization: training_step returns the loss."""

    def __init__(self):
        super().__init__()
        self.net = resnet()
        self.losses = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = ce(self(batch[0]), batch[1])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def main() -> None:
    out, devices, bn = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    x, y = data(image=True)
    module = Automatic() if bn == "automatic" else Classifier(bn)
    callbacks = [AutoBatchCallback(micro_batch=4, cache=False)] if bn == "automatic" else []
    # Each process's loader yields its half of the logical batch of 16, as the other tests' ranks take it
    # (Lightning's DistributedSampler would interleave the samples instead: another split of the same batch).
    rank = int(os.environ.get("LOCAL_RANK", 0))
    share = 16 // devices
    loader = DataLoader(TensorDataset(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]),
                        batch_size=share, shuffle=False)
    strategy = AutoBatchDDPStrategy(process_group_backend="gloo") if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=True,
                        use_distributed_sampler=False, callbacks=callbacks)
    trainer.fit(module, loader)
    rank = trainer.global_rank
    logged = float(trainer.callback_metrics["train_loss"])
    torch.save({"loss": module.losses, "logged": logged, "world": trainer.world_size,
                "state": {k: v.clone() for k, v in module.net.state_dict().items()},
                "keys": list(module.state_dict())}, f"{out}/lightning-{bn}-{devices}-{rank}.pt")
    # gloo's threads must end before the interpreter does (else: "terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
