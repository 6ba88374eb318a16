"""Cosine of the accumulated gradient against the true full-batch gradient, per BatchNorm strategy.

    python bench/gradient_cosine.py            # writes bench/results/gradient_cosine.md

float64, the residual CNN of the tests (9 BatchNorm layers, 12x12 inputs), logical batch 16,
random inputs and labels, 5 seeds; optionally with a BatchNorm1d on the pooled features.
"""
from __future__ import annotations

import argparse
import copy
import logging
import pathlib
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autobatch  # noqa: E402
from autobatch.demo.models import ResidualNet  # noqa: E402
from autobatch.reference import cosine, flat_grad, frozen_statistics_grad, full_batch_grad, plain_accumulation_grad  # noqa: E402
from autobatch.split import balanced_splits  # noqa: E402

ARMS = ("frozen statistics (forum)", "plain accumulation", "autobatch bn='micro'", "autobatch bn='two_pass'")


def autobatch_grad(model, x, y, loss_fn, micro_batch, bn):
    model = copy.deepcopy(model)
    grads = []
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    autobatch.wrap(model, opt, len(x), loss_fn, micro_batch=micro_batch, bn=bn,
                   before_step=lambda ab: grads.append(flat_grad(ab.model))).step(x, y)
    return grads[0]


def measure(splits_count: int, seeds: int, head_norm: bool) -> dict[str, list[float]]:
    ce = nn.CrossEntropyLoss()
    results: dict[str, list[float]] = {arm: [] for arm in ARMS}
    micro_batch = 16 // splits_count
    splits = balanced_splits(16, micro_batch)
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = ResidualNet(blocks=4, head_norm=head_norm).double()
        x, y = torch.randn(16, 3, 12, 12, dtype=torch.float64), torch.randint(0, 5, (16,))
        reference = full_batch_grad(model, x, y, ce)
        grads = [frozen_statistics_grad(model, x, y, ce, splits), plain_accumulation_grad(model, x, y, ce, splits),
                 autobatch_grad(model, x, y, ce, micro_batch, "micro"),
                 autobatch_grad(model, x, y, ce, micro_batch, "two_pass")]
        for arm, grad in zip(ARMS, grads):
            results[arm].append(cosine(grad, reference))
    return results


def layer_cosines(splits_count: int, seeds: int) -> dict[str, list[float]]:
    """two_pass's cosine to the full batch of each BatchNorm layer's dgamma (weight) and dbeta (bias)."""
    ce = nn.CrossEntropyLoss()
    results: dict[str, list[float]] = {}
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = ResidualNet(blocks=4).double()
        x, y = torch.randn(16, 3, 12, 12, dtype=torch.float64), torch.randint(0, 5, (16,))
        full = copy.deepcopy(model)
        ce(full(x), y).backward()
        ours, grads = copy.deepcopy(model), {}
        keep = lambda ab: grads.update({name: p.grad.clone() for name, p in ab.model.named_parameters()})  # noqa: E731
        autobatch.wrap(ours, torch.optim.SGD(ours.parameters(), lr=0.0), 16, ce, micro_batch=16 // splits_count,
                       cache=False, before_step=keep).step(x, y)
        for name, p in full.named_parameters():
            if name.endswith(("bn.weight", "bn.bias", "bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias")):
                results.setdefault(name, []).append(cosine(grads[name], p.grad))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "gradient_cosine.md"))
    args = parser.parse_args()
    logging.getLogger("autobatch").setLevel(logging.ERROR)  # the thin-layer warning is the point here
    lines = ["# Gradient cosine against the full batch", "",
             "`python bench/gradient_cosine.py` (float64, CPU). Mean over "
             f"{args.seeds} seeds, with the lowest seed in brackets.", ""]
    for head_norm in (False, True):
        title = ("9 BatchNorm2d layers" if not head_norm
                 else "9 BatchNorm2d layers + BatchNorm1d on pooled features (m values per channel in a micro-batch of m)")
        lines += [f"## {title}", "", "| strategy | 2 splits | 4 splits | 8 splits |", "| --- | --- | --- | --- |"]
        table = {k: measure(k, args.seeds, head_norm) for k in (2, 4, 8)}
        for arm in ARMS:
            cells = [f"{statistics.mean(table[k][arm]):.3f} ({min(table[k][arm]):.3f})" for k in (2, 4, 8)]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Per layer: two_pass's dgamma (`.weight`) and dbeta (`.bias`), 4 splits", "",
              "Cosine to the full batch's, in forward order (the last layer is the one nearest the loss).", "",
              "| parameter | mean cosine (lowest) |", "| --- | --- |"]
    for name, values in layer_cosines(4, args.seeds).items():
        lines.append(f"| {name} | {statistics.mean(values):.3f} ({min(values):.3f}) |")
    lines.append("")
    text = "\n".join(lines)
    pathlib.Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
