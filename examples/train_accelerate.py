"""Hugging Face Accelerate with autobatch: prepare as usual, then wrap; a logical batch of 32.

    python examples/train_accelerate.py                                                      # one process
    accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py             # two (on CPU: gloo)
    accelerate launch --mixed_precision bf16 examples/train_accelerate.py

Accelerate's prepared model is DistributedDataParallel on several processes and runs under its
autocast; autobatch splits each process's share into micro-batches, syncs gradients once per logical
batch and gives BatchNorm the statistics of all 32 samples.
"""
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from train_classifier import make_data, make_model  # the sibling example: same data and model

import autobatch.integrations.accelerate


def main() -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)  # the same initial weights in every process
    images, labels = make_data(512, torch.Generator().manual_seed(0))
    target_batch = 32
    loader = DataLoader(TensorDataset(images, labels), batch_size=target_batch // accelerator.num_processes,
                        shuffle=True, generator=torch.Generator().manual_seed(0))
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ab = autobatch.integrations.accelerate.wrap(accelerator, model, optimizer, target_batch=target_batch,
                                                loss_fn=nn.CrossEntropyLoss(), memory_budget="2MiB")
    for epoch in range(2):
        losses = [ab.step(x, y) for x, y in loader]
        accelerator.print(f"epoch {epoch}: mean training loss {sum(losses) / len(losses):.4f}")
    accelerator.print(ab.plan)


if __name__ == "__main__":
    main()
