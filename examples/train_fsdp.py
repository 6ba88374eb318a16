"""Sharded training with autobatch: fully_shard (FSDP2) over torchrun, a global logical batch of 32.

    torchrun --nproc_per_node=2 examples/train_fsdp.py          # CPU (gloo) or GPUs (NCCL)

Each block and the root are sharded with torch.distributed.fsdp.fully_shard, so every rank holds
half of the parameters and of the optimizer state. Each rank's loader yields its 16 of the 32
samples; autobatch plans its micro-batches under a memory budget (its trials run on every rank at
once, since a sharded forward gathers parameters from every rank), reduce-scatters gradients once per
logical batch, and two_pass BatchNorm normalizes with the statistics of all 32 samples.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from train_classifier import make_model  # the sibling examples: same data, model and process group
from train_ddp import start

import autobatch


def main() -> None:
    target_batch = 32
    rank, world_size, device, sampler, loader = start(target_batch)  # then each rank's copy is sharded
    model = make_model().to(device)
    for block in model:
        if any(True for _ in block.parameters()):
            fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # The budget stands in for a small GPU: the planner splits each rank's 16 samples.
    ab = autobatch.wrap(model, optimizer, target_batch=target_batch, loss_fn=nn.CrossEntropyLoss(),
                        memory_budget="1MiB", cache=False)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        losses = [ab.step(x.to(device), y.to(device)) for x, y in loader]  # the same mean loss on every rank
        if rank == 0:
            print(f"epoch {epoch}: mean training loss {sum(losses) / len(losses):.4f}")
    if rank == 0:
        print(ab.plan)
        local = next(model.parameters()).to_local().shape
        print(f"rank 0 holds a shard of {tuple(local)} of the first layer's weight")
    dist.barrier()  # every rank done with its collectives before the group ends
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
