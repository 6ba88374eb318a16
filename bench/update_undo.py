"""What the all-or-nothing optimizer step costs: autobatch's step with and without the copies of the
parameters and optimizer state taken before the update, and with and without the check that the update
left every parameter finite, side by side in one run, and the copies' size against the step's measured peak.

    python bench/update_undo.py                                   # CPU: the demo U-Net at 64x64, Adam
    python bench/update_undo.py --model resnet50 --size 224 --device cuda

Arms run interleaved, in a new random order each round, after warm-up rounds; medians reported.
"""
from __future__ import annotations

import contextlib
import copy
import pathlib
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autobatch  # noqa: E402
from autobatch import microstep, transaction  # noqa: E402
from autobatch.planning.measure import peak_bytes  # noqa: E402
from bench.cost import prepared, step_arguments, sync  # noqa: E402


def main() -> None:
    args = step_arguments(__doc__).parse_args()
    device, base, x, y, loss_fn = prepared(args)
    arms = {}
    for arm in ("with copies", "with copies, no finite check", "without copies"):
        model = copy.deepcopy(base)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        arms[arm] = autobatch.wrap(model, optimizer, args.target_batch, loss_fn, micro_batch=args.micro_batch,
                                   cache=False)

    check = microstep.MicroStep.__dict__["_check_finite_update"]  # the staticmethod itself

    def run(arm: str) -> float:
        undo = transaction.update_transaction if arm.startswith("with copies") else (
            lambda *a, **k: contextlib.nullcontext())
        microstep.update_transaction = undo
        if arm == "with copies, no finite check":
            microstep.MicroStep._check_finite_update = staticmethod(lambda params: None)
        sync(device)
        start = time.perf_counter()
        arms[arm].step(x, y)
        sync(device)
        microstep.update_transaction = transaction.update_transaction
        microstep.MicroStep._check_finite_update = check
        return time.perf_counter() - start

    times = {arm: [] for arm in arms}
    for round_ in range(args.warmup + args.rounds):
        order = list(arms)
        random.shuffle(order)
        for arm in order:
            seconds = run(arm)
            if round_ >= args.warmup:
                times[arm].append(seconds)
    ab = arms["with copies"]
    params = list(ab.model.parameters())  # every one has a gradient at the update
    copied = sum(p.numel() * p.element_size() for p in params) + sum(
        t.numel() * t.element_size() for s in ab.optimizer.state.values() for t in s.values()
        if isinstance(t, torch.Tensor))
    peak = peak_bytes(lambda: ab.step(x, y), device, ab.model, ab.optimizer, (x, y))
    median = {arm: statistics.median(values) for arm, values in times.items()}
    lines = [
        f"# The all-or-nothing optimizer step: {args.model} {args.size}x{args.size}, logical batch "
        f"{args.target_batch} in micro-batches of {args.micro_batch}, two_pass, Adam",
        "",
        f"Device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}; {args.rounds} rounds after {args.warmup} warm-up, interleaved.",
        "",
        "| arm | median step (s) | ratio |",
        "|---|---|---|",
    ]
    for arm in arms:
        lines.append(f"| {arm} | {median[arm]:.4f} | {median[arm] / median['without copies']:.3f} |")
    lines += ["", f"Copies: {copied / 2**20:.1f} MiB (parameters and Adam's state); the whole step's measured "
                  f"peak (with them): {peak / 2**20:.1f} MiB."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
