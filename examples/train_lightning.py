"""PyTorch Lightning with autobatch: automatic optimization, the LightningModule as you write it; a batch of 32.

    python examples/train_lightning.py              # one device
    python examples/train_lightning.py --devices 2  # Lightning launches 2 processes (on CPU: gloo)

The module below is plain Lightning: training_step returns the loss, configure_optimizers gives an
optimizer and a scheduler, the Trainer clips gradients and accumulates 2 batches per step. The one
addition is the callback (and, with several processes, AutoBatchDDPStrategy): every batch is split into
micro-batches that fit the memory budget, and its gradient is the whole batch's, BatchNorm included.
"""
import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from train_classifier import make_data, make_model  # the sibling example: same data and model

from autobatch.integrations.lightning import AutoBatchCallback, AutoBatchDDPStrategy

BATCH = 32


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_model()
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = self.criterion(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 4, 0.5)}


def loader_and_strategy(devices: int, batch: int) -> tuple[DataLoader, object]:
    """The sibling example's images, each process's share of every batch, and the strategy for ``devices``."""
    torch.manual_seed(0)  # the same initial weights in every process
    images, labels = make_data(512, torch.Generator().manual_seed(0))
    # Lightning gives each process its part of every batch (a DistributedSampler): its share of the batch.
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch // devices, shuffle=True)
    strategy = AutoBatchDDPStrategy(process_group_backend="gloo" if not torch.cuda.is_available() else None) \
        if devices > 1 else "auto"
    return loader, strategy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=1, help="processes (devices) to train on")
    args = parser.parse_args()
    loader, strategy = loader_and_strategy(args.devices, BATCH)
    trainer = L.Trainer(accelerator="auto", devices=args.devices, strategy=strategy, max_epochs=2, logger=False,
                        enable_checkpointing=False, gradient_clip_val=1.0, accumulate_grad_batches=2,
                        callbacks=[AutoBatchCallback(memory_budget="2MiB")])
    trainer.fit(Classifier(), loader)


if __name__ == "__main__":
    main()
