"""Distributed training with autobatch: DDP over torchrun, a global logical batch of 32.

    torchrun --nproc_per_node=2 examples/train_ddp.py          # CPU (gloo) or GPUs (NCCL)

Each rank's loader yields its 16 of the 32 samples; autobatch splits them into micro-batches,
all-reduces gradients once per logical batch, and two_pass BatchNorm normalizes with the
statistics of all 32 samples, the way SyncBatchNorm would with one micro-batch per device.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from train_classifier import make_data, make_model  # the sibling example: same data and model

import autobatch


def start(target_batch: int) -> tuple[int, int, torch.device, DistributedSampler, DataLoader]:
    """The process group (NCCL on GPUs, gloo on the CPU), this rank's device, and a loader of its share
    of every logical batch: (rank, world_size, device, sampler, loader)."""
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial weights on every rank
    dataset = TensorDataset(*make_data(512, torch.Generator().manual_seed(0)))
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    return rank, world_size, device, sampler, DataLoader(dataset, batch_size=target_batch // world_size,
                                                         sampler=sampler)


def main() -> None:
    target_batch = 32
    rank, world_size, device, sampler, loader = start(target_batch)
    cuda = device.type == "cuda"
    model = DistributedDataParallel(make_model().to(device), device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ab = autobatch.wrap(model, optimizer, target_batch=target_batch, loss_fn=nn.CrossEntropyLoss(),
                        memory_budget="1MiB")  # stands in for a small GPU: the planner splits the batch
    for epoch in range(2):
        sampler.set_epoch(epoch)
        losses = [ab.step(x, y) for x, y in loader]  # the same mean loss on every rank
        if rank == 0:
            print(f"epoch {epoch}: mean training loss {sum(losses) / len(losses):.4f}")
    running = model.module[0][1].running_mean
    same = [torch.zeros_like(running) for _ in range(world_size)]
    dist.all_gather(same, running)
    if rank == 0:
        print(ab.plan)
        print("BatchNorm running statistics identical on every rank:", all(torch.equal(s, same[0]) for s in same))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
