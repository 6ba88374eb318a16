"""Run by ``accelerate launch`` from tests/test_integrations.py: autobatch steps through Accelerate,
each scenario's result saved per process."""
import sys

import torch
from accelerate import Accelerator
from torch import nn

import autobatch.integrations.accelerate
from tests.distributed_worker import data, resnet

ce = nn.CrossEntropyLoss()


def run(accelerator, bn, dtype):
    model = resnet().to(dtype)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.5))
    options = dict(micro_batch=4) if bn == "two_pass" else dict(memory_budget=10**10)
    ab = autobatch.integrations.accelerate.wrap(accelerator, model, optimizer, 16, ce, bn=bn, cache=False, **options)
    rank, world = accelerator.process_index, accelerator.num_processes
    x, y = data(image=True)
    rows = slice(rank * 16 // world, (rank + 1) * 16 // world)
    loss = ab.step(x[rows].to(dtype), y[rows])
    state = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    return {"loss": [loss], "state": state, "world": world}


def main() -> None:
    out, scenarios = sys.argv[1], sys.argv[2].split(",")
    accelerator = Accelerator(cpu=True)
    # Mixed precision autocasts float32 only: those runs train a float32 model.
    dtype = torch.float64 if accelerator.mixed_precision == "no" else torch.float32
    for bn in scenarios:
        torch.save(run(accelerator, bn, dtype), f"{out}/{accelerator.mixed_precision}-{bn}-{accelerator.process_index}.pt")
    # gloo's threads must end before the interpreter does (else: "terminate called without an active exception").
    accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
