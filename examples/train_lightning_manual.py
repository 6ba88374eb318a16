"""PyTorch Lightning with autobatch: manual optimization, ab.step in training_step; a logical batch of 32.

    python examples/train_lightning_manual.py              # one device
    python examples/train_lightning_manual.py --devices 2  # Lightning launches 2 processes (on CPU: gloo)

Lightning launches, logs, shows the loss in its progress bar and counts steps; autobatch splits each
process's share into micro-batches, syncs gradients once per logical batch (AutoBatchDDPStrategy) and
gives BatchNorm the statistics of all 32 samples.
"""
import argparse

import lightning as L
import torch
from torch import nn
from train_classifier import make_model  # the sibling examples: the model, and the data and strategy
from train_lightning import loader_and_strategy

import autobatch.integrations.lightning

TARGET_BATCH = 32


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False  # autobatch takes the optimizer step
        self.net = make_model()
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        ab = autobatch.integrations.lightning.wrap(self, TARGET_BATCH, self.criterion, memory_budget="2MiB")
        self.log("train_loss", ab.step(*batch), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=1, help="processes (devices) to train on")
    args = parser.parse_args()
    loader, strategy = loader_and_strategy(args.devices, TARGET_BATCH)
    trainer = L.Trainer(accelerator="auto", devices=args.devices, strategy=strategy, max_epochs=2, logger=False,
                        enable_checkpointing=False)
    trainer.fit(Classifier(), loader)


if __name__ == "__main__":
    main()
