"""How good and how cheap is micro_batch="auto"? The planner's choice against the true largest micro-batch.

    python bench/planner.py                  # CPU: writes bench/results/planner.md
    python bench/planner.py --device cuda    # a GPU: also against real out-of-memory

For each model and memory budget: the planner's micro-batch and its trial steps; the true largest
micro-batch found by exhaustive search over every size 1..target_batch with the same real
measurement (a full training micro-step each); and how much longer the exhaustive search took. On CUDA the exhaustive search
also runs against real out-of-memory: the process is capped at the budget with
torch.cuda.set_per_process_memory_fraction and each size is a real training step.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autobatch  # noqa: E402
from autobatch.demo import UNet, shapes  # noqa: E402
from autobatch.demo.models import ResidualNet  # noqa: E402
from autobatch.oom import is_out_of_memory  # noqa: E402
from autobatch.planning.measure import warm_optimizer_state  # noqa: E402
from autobatch.sizes import format_bytes  # noqa: E402
from autobatch.transaction import trial_transaction as preserved  # noqa: E402

ce = nn.CrossEntropyLoss()


def models(device: torch.device):
    """(name, model, inputs, targets, target_batch) for each benchmarked model."""
    torch.manual_seed(0)
    x, y = shapes(32, 48, 0)
    yield "demo U-Net, 48x48", UNet().to(device), x, y, 32
    x = torch.randn(64, 3, 32, 32)
    yield "residual CNN, 9 BN, 32x32", ResidualNet(blocks=4, channels=32).to(device), x, torch.randint(0, 5, (64,)), 64


def exhaustive(ab, x, y, target: int, budget_bytes: int) -> tuple[int, float]:
    """The largest n whose measured peak fits, trying every n (the same measurement as the planner)."""
    start = time.perf_counter()
    best = 0
    with preserved(ab.model, ab.optimizer):
        warm_optimizer_state(ab.optimizer)
        for n in range(1, target + 1):
            peak = ab._planner.setting.trials.micro_step_peak((x, y), n)
            if peak is not None and peak <= budget_bytes:
                best = n
    return best, time.perf_counter() - start


def real_out_of_memory(model, x, y, target: int, budget_bytes: int, device: torch.device) -> int:
    """CUDA only: the largest n whose real training step runs with the allocator capped at the budget."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(budget_bytes / total, device)
    best = 0
    optimizer = torch.optim.Adam(model.parameters())
    try:
        with preserved(model, optimizer):
            for n in range(1, target + 1):
                failed = False
                try:
                    ce(model(x[:n].to(device)), y[:n].to(device)).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                except BaseException as error:  # noqa: BLE001 - only out-of-memory is expected here
                    if not is_out_of_memory(error):
                        raise
                    failed = True
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                if failed:
                    break
                best = n
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "planner.md"))
    args = parser.parse_args()
    logging.getLogger("autobatch").setLevel(logging.ERROR)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (2 cores)"
    lines = ["# The planner against exhaustive search", "",
             f"`python bench/planner.py --device {args.device}` on {name}. Budgets are caps given as "
             "`memory_budget` (less the 10% margin). Exhaustive: every size 1..target_batch measured the same "
             "way; one trial is one real training micro-step.", "",
             "| model | budget | planner's capacity (largest micro-batch it allows) | true largest | planner trials | exhaustive trials | "
             "exhaustive time / planner time |" + (" largest without real OOM |" if device.type == "cuda" else ""),
             "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if device.type == "cuda" else "")]
    for title, model, x, y, target in models(device):
        for fraction in (0.25, 0.5, 0.75):
            probe = autobatch.wrap(model, torch.optim.Adam(model.parameters()), target, ce, cache=False,
                                   memory_budget=10**12, bn="micro")
            whole = probe.tune(x, y).predicted_peak_bytes  # the line's peak for the whole batch
            cap = int(whole * fraction / 0.9)
            ab = autobatch.wrap(model, torch.optim.Adam(model.parameters()), target, ce, cache=False,
                                memory_budget=cap, bn="micro")
            start = time.perf_counter()
            plan = ab.tune(x, y)
            seconds = time.perf_counter() - start
            truth, truth_seconds = exhaustive(ab, x, y, target, plan.budget_bytes)
            row = (f"| {title} | {format_bytes(plan.budget_bytes)} | {plan.capacity} | {truth} | {plan.trials} | "
                   f"{target} | {truth_seconds / seconds:.0f}x |")
            if device.type == "cuda":
                row += f" {real_out_of_memory(model, x, y, target, plan.budget_bytes, device)} |"
            lines.append(row)
            print(row, flush=True)
    lines.append("")
    pathlib.Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
