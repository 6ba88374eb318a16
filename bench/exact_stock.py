"""bn="exact" on stock torchvision EfficientNet-B0 (stochastic depth, in-place activations and dropout),
float64: every checkpointing policy the planner would try, against one plain full-batch step.

    python bench/exact_stock.py        # needs torchvision (a venv with torch==2.14.1 torchvision==0.29.1)
"""
from __future__ import annotations

import copy
import pathlib
import sys

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autobatch  # noqa: E402
from autobatch.checkpointing import candidates  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    base = torchvision.models.efficientnet_b0(num_classes=10).double()
    x, y = torch.randn(8, 3, 64, 64, dtype=torch.float64), torch.randint(0, 10, (8,))
    ce = nn.CrossEntropyLoss()
    reference = copy.deepcopy(base)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    torch.manual_seed(5)
    expected = ce(reference(x), y)
    expected.backward()
    optimizer.step()
    print("| policy | modules | loss difference | largest parameter or buffer difference |")
    print("|---|---|---|---|")
    for policy in candidates(base)[1:]:
        model = copy.deepcopy(base)
        ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, ce, bn="exact", cache=False,
                            memory_budget=10**11)
        ab.tune(x, y)
        ab.plan = ab.plan.replace(checkpointing=policy)
        torch.manual_seed(5)
        try:
            loss = ab.step(x, y)
        except RuntimeError as error:
            print(f"| {policy.label} | {len(policy.modules)} | fails: {str(error)[:70]} | |")
            continue
        difference = max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(),
                                                                   reference.state_dict().values())
                         if a.is_floating_point())
        print(f"| {policy.label} | {len(policy.modules)} | {abs(loss - expected.item()):.1e} | {difference:.1e} |")


if __name__ == "__main__":
    main()
