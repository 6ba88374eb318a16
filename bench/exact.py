"""Exact mode (bn="exact"): how large a logical batch fits a fixed memory budget with activation
checkpointing against plain execution, and what a step costs against two_pass and plain accumulation.

    python bench/exact.py                                     # the demo U-Net, 48x48, on the CPU
    python bench/exact.py --model resnet50 --size 112         # ResNet-50 (bench/resnet.py)
    python bench/exact.py --model resnet50 --size 224 --device cuda

The budget is the measured peak of one plain training step at ``--base-batch`` samples. Peaks are
measured (CUDA's allocator statistics, or every tensor storage on the host); step times are medians of
interleaved rounds, in one run.
"""
from __future__ import annotations

import copy
import pathlib
import platform
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autobatch  # noqa: E402
from autobatch.batchnorm import strategy_for  # noqa: E402
from autobatch.checkpointing import candidates  # noqa: E402
from autobatch.microstep import MicroStep  # noqa: E402
from autobatch.options import Options  # noqa: E402
from autobatch.planning.measure import peak_bytes, warm_optimizer_state  # noqa: E402
from autobatch.planning.memory import format_bytes  # noqa: E402
from autobatch.planning.trials import Trials, timed  # noqa: E402
from autobatch.split import balanced_splits  # noqa: E402
from autobatch.transaction import trial_transaction  # noqa: E402
from bench.cost import interleaved_times, plain_step, prepared, step_arguments  # noqa: E402


def optimizer_for(model):
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)


def peaks(model, x, y, loss_fn, batch, device):
    """The whole-batch step's measured peak under every checkpointing policy."""
    optimizer = optimizer_for(model)
    options = Options.build(model, optimizer, batch, loss_fn=loss_fn, bn="exact", device=device)
    micro = MicroStep(model, optimizer, options)
    trials = Trials(micro, strategy_for(options.bn, micro))
    found = {}
    with trial_transaction(model, optimizer):
        warm_optimizer_state(optimizer)
        for policy in candidates(model):
            work = trials.whole_batch_step((x, y), policy)
            found[policy] = peak_bytes(work, device, model, optimizer, (x, y))
            found[policy, "seconds"] = timed(work, device)
    return found


def main() -> None:
    parser = step_arguments(__doc__)
    parser.set_defaults(size=48, micro_batch=8)
    parser.add_argument("--base-batch", type=int, default=8, help="the budget is one plain step at this batch")
    parser.add_argument("--largest", type=int, default=4, help="try logical batches up to this many base batches")
    args = parser.parse_args()
    args.target_batch = args.base_batch * args.largest

    device, base, x, y, loss_fn = prepared(args)
    budget = peaks(base, x, y, loss_fn, args.base_batch, device)[candidates(base)[0]]
    lines = [f"# Exact mode: {args.model} {args.size}x{args.size}",
             "", f"Device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}), "
             f"torch {torch.__version__}. Budget: the measured peak of a plain step at {args.base_batch} samples, "
             f"{format_bytes(budget)}.", "", "## The largest logical batch that fits", "",
             "| logical batch | no checkpointing | best policy | its peak | fits |", "|---|---|---|---|---|"]
    fits = {"plain": args.base_batch, "exact": args.base_batch}
    chosen = {}
    for multiple in range(1, args.largest + 1):
        batch = multiple * args.base_batch
        found = peaks(base, x, y, loss_fn, batch, device)
        policies = [p for p in candidates(base) if found[p] <= budget]
        best = min(policies, key=lambda p: found[p, "seconds"]) if policies else min(candidates(base), key=found.get)
        chosen[batch] = best
        plain = found[candidates(base)[0]]
        if plain <= budget:
            fits["plain"] = batch
        if policies:
            fits["exact"] = batch
        lines.append(f"| {batch} | {format_bytes(plain)} | {best.label} | {format_bytes(found[best])} | "
                     f"{'yes' if policies else 'no'} |")
    lines += ["", f"Plain execution fits {fits['plain']} samples; exact mode fits {fits['exact']} "
                  f"({fits['exact'] / fits['plain']:.1f}x).", ""]
    lines += step_times(args, base, x, y, loss_fn, device, fits["exact"], chosen)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)


def step_times(args, base, x, y, loss_fn, device, batch, chosen):
    """Exact (the fastest policy that fits) against two_pass and plain accumulation in micro-batches
    of --base-batch, at the largest logical batch exact mode fits."""
    x, y = x[:batch], y[:batch]
    splits = balanced_splits(batch, args.base_batch)
    arms = {}
    exact_model = copy.deepcopy(base)
    exact = autobatch.wrap(exact_model, optimizer_for(exact_model), batch, loss_fn, bn="exact", cache=False,
                           memory_budget=10**12)
    exact.tune(x, y)
    exact.plan = exact.plan.replace(checkpointing=chosen[batch])
    arms[f"exact, {chosen[batch].label}"] = lambda: exact.step(x, y)
    two_pass_model = copy.deepcopy(base)
    two_pass = autobatch.wrap(two_pass_model, optimizer_for(two_pass_model), batch, loss_fn,
                              micro_batch=args.base_batch, cache=False)
    arms[f"two_pass, micro-batches of {args.base_batch}"] = lambda: two_pass.step(x, y)
    plain = copy.deepcopy(base)
    arms[f"plain accumulation, micro-batches of {args.base_batch}"] = plain_step(plain, optimizer_for(plain), x, y,
                                                                                loss_fn, splits)
    times = interleaved_times(arms, args.rounds, args.warmup, device)
    reference = statistics.median(times[f"plain accumulation, micro-batches of {args.base_batch}"])
    lines = [f"## Step time at a logical batch of {batch}", "",
             f"{args.rounds} interleaved rounds after {args.warmup} warm-up; medians.", "",
             "| arm | median step | ratio to plain accumulation |", "|---|---|---|"]
    for arm, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {arm} | {median:.3f} s | {median / reference:.2f}x |")
    return lines


if __name__ == "__main__":
    main()
