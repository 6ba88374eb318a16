"""Stock EfficientNet-B0 (torchvision's, and timm's with drop_path_rate=0.2) under autobatch on the CPU.

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm -e .
    /tmp/tv/bin/python bench/efficientnet.py     # ~20 min on 2 CPU cores; prints the figures

Needs torchvision and timm, which need the full torch build they were made for, so it stays out
of CI. Logical batch 16, micro-batches of 4, random 64x64 inputs, SGD lr 0.01 momentum 0.9. Per
seed: the first step's gradient norm for the full batch, two_pass and micro, and five steps'
losses (a step that fails prints its error). Then, per model, the cosine of the first gradient to
the full batch's with the same stochastic-depth masks (the generator seeded alike; torchvision's
classifier dropout, which comes after the last BatchNorm, set to 0 there).
"""
import copy
import logging

import timm
import torch
import torchvision
from torch import nn

import autobatch

logging.getLogger("autobatch").setLevel(logging.ERROR)
ce = nn.CrossEntropyLoss()


def make(kind):
    if kind == "torchvision":
        return torchvision.models.efficientnet_b0(num_classes=10)
    return timm.create_model("efficientnet_b0", num_classes=10, drop_path_rate=0.2)


def flat(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def norms_and_losses(kind, seed):
    torch.manual_seed(seed)
    base = make(kind)
    generator = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(16, 3, 64, 64, generator=generator), torch.randint(0, 10, (16,), generator=generator))
               for _ in range(5)]
    full = copy.deepcopy(base)
    torch.manual_seed(100)
    ce(full(batches[0][0]), batches[0][1]).backward()
    row = {"full batch": round(flat(full).norm().item(), 1)}
    for bn in ("two_pass", "micro"):
        model, norms, losses = copy.deepcopy(base), [], []
        ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), 16, ce, micro_batch=4,
                            bn=bn, cache=False, before_step=lambda ab: norms.append(flat(ab.model).norm().item()))
        torch.manual_seed(100)
        for x, y in batches:
            try:
                losses.append(round(ab.step(x, y), 3))
            except Exception as error:  # noqa: BLE001 - reported, as a user would see it
                losses.append(f"{type(error).__name__}: {str(error)[:80]}")
        row[bn] = (round(norms[0], 1) if norms else None, losses)
    return row


def cosines(kind):
    torch.manual_seed(0)
    base = make(kind)
    if kind == "torchvision":
        base.classifier[0].p = 0.0
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 64, 64, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    full = copy.deepcopy(base)
    torch.manual_seed(100)
    ce(full(x), y).backward()
    reference = flat(full)
    row = {"full norm": round(reference.norm().item(), 1)}
    for bn, micro_batch in (("two_pass", 4), ("micro", 4), ("two_pass", 8), ("micro", 8)):
        model, grads = copy.deepcopy(base), []
        ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0), 16, ce, micro_batch=micro_batch, bn=bn,
                            cache=False, phase1_memory_format=torch.preserve_format,
                            before_step=lambda ab: grads.append(flat(ab.model)))
        torch.manual_seed(100)
        ab.step(x, y)
        row[f"{bn}, micro-batches of {micro_batch}"] = (
            round(grads[0].norm().item(), 1), round(nn.functional.cosine_similarity(grads[0], reference, dim=0).item(), 3))
    return row


def main():
    torch.set_num_threads(2)
    for kind in ("torchvision", "timm"):
        for seed in range(3):
            print(kind, "seed", seed, norms_and_losses(kind, seed), flush=True)
        print(kind, "gradient (norm, cosine to the full batch)", cosines(kind), flush=True)


if __name__ == "__main__":
    main()
