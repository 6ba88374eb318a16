"""The time of one logical step, side by side in one run: full batch, plain accumulation, autobatch
two_pass and micro, and the forum's Python BatchNorm. Ratios to plain accumulation.

    python bench/cost.py                       # CPU: the demo U-Net at 64x64, logical batch 16, 4 splits
    python bench/cost.py --channels-last       # the same, with the model and its inputs in channels_last
    python bench/cost.py --compile             # every arm's model under torch.compile (inductor)
    python bench/cost.py --model resnet50 --size 224 --device cuda     # on a GPU (bench/resnet.py)

Arms run interleaved, in a new random order each round, after warm-up rounds; the median per arm
is reported. Phase 1's share of a two_pass step is timed inside the same steps.
"""
from __future__ import annotations

import argparse
import copy
import logging
import pathlib
import platform
import random
import statistics
import sys
import time
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autobatch  # noqa: E402
from autobatch.demo import UNet, shapes  # noqa: E402
from autobatch.reference import plain_accumulation_backward  # noqa: E402
from autobatch.split import balanced_splits  # noqa: E402
from bench.forum_batchnorm import forum_model, forum_step  # noqa: E402

GIVEN_FORMAT = "autobatch two_pass, phase 1 in the inputs' format"
PLAIN_CHANNELS_LAST = "plain accumulation, model and inputs in channels_last"
ARMS = ("full batch", "plain accumulation", PLAIN_CHANNELS_LAST, "autobatch two_pass", GIVEN_FORMAT,
        "autobatch micro", "forum Python BatchNorm")


def make(model_name: str, size: int, batch: int, device: torch.device):
    if model_name == "unet":
        model = UNet(width=32)
        x, y = shapes(batch, size, 0)
        loss_fn = nn.CrossEntropyLoss()
    else:
        if model_name == "resnet50":  # the same network as torchvision's, without needing it
            from bench.resnet import resnet50 as build
        else:
            import torchvision

            build = getattr(torchvision.models, model_name)
        model = build(num_classes=100)
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, 100, (batch,))
        loss_fn = nn.CrossEntropyLoss()
    return model.to(device), x.to(device), y.to(device), loss_fn


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_step(model, optimizer, x, y, loss_fn, splits: list[int]) -> Callable[[], None]:
    """One step of plain accumulation over ``splits`` and the update: the arm every timing is a ratio to."""
    def step() -> None:
        plain_accumulation_backward(model, x, y, loss_fn, splits)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def interleaved_times(steps: dict[str, Callable[[], None]], rounds: int, warmup: int,
                      device: torch.device = torch.device("cpu")) -> dict[str, list[float]]:
    """Each arm's step timed in ``rounds`` rounds after ``warmup`` rounds, the arms in a new random order each
    round (seeded), the device synchronized around each: seconds per arm."""
    times: dict[str, list[float]] = {arm: [] for arm in steps}
    order = list(steps)
    rng = random.Random(0)
    for round_ in range(warmup + rounds):
        rng.shuffle(order)
        for arm in order:
            sync(device)
            start = time.perf_counter()
            steps[arm]()
            sync(device)
            if round_ >= warmup:
                times[arm].append(time.perf_counter() - start)
    return times


def step_arguments(description: str) -> argparse.ArgumentParser:
    """The options of a side-by-side timing of logical steps (this benchmark's and others')."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--target-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    return parser


def prepared(args: argparse.Namespace):
    """The device, the model, one logical batch and the loss the options name (seeded; autobatch quiet)."""
    logging.getLogger("autobatch").setLevel(logging.ERROR)
    device = torch.device(args.device)
    torch.manual_seed(0)
    return (device,) + make(args.model, args.size, args.target_batch, device)


def main() -> None:
    parser = step_arguments(__doc__)
    parser.add_argument("--channels-last", action="store_true",
                        help="the model and its inputs in channels_last for every arm")
    parser.add_argument("--compile", action="store_true",
                        help="every arm's model under torch.compile")
    args = parser.parse_args()
    device, base, x, y, loss_fn = prepared(args)
    if args.channels_last:
        base, x = base.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    splits = balanced_splits(args.target_batch, args.micro_batch)
    phase1_seconds = []
    fast = torch.compile if args.compile else (lambda model: model)
    if args.compile:  # six compiled copies of one model class, each in several variants, share its code's cache
        torch._dynamo.config.recompile_limit = 64

    def optimizer_for(model):
        return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    full = copy.deepcopy(base)
    full_opt = optimizer_for(full)
    full_fast = fast(full)

    def full_step():
        loss_fn(full_fast(x), y).backward()
        full_opt.step()
        full_opt.zero_grad(set_to_none=True)

    plain = copy.deepcopy(base)
    plain_fast = fast(plain)

    # What a user gains by moving the whole training to channels_last (the same as plain with --channels-last).
    plain_cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    wrapped = {}
    for arm, bn, memory_format in (("two_pass", "two_pass", None), ("given", "two_pass", torch.preserve_format),
                                   ("micro", "micro", None)):
        model = copy.deepcopy(base)
        mode = autobatch.TwoPass(phase1_memory_format=memory_format) if bn == "two_pass" else bn
        wrapped[arm] = autobatch.wrap(fast(model), optimizer_for(model), args.target_batch, loss_fn,
                                      micro_batch=args.micro_batch, bn=mode, cache=False)
    two_pass = wrapped["two_pass"]
    phase1 = two_pass._strategy._phase1

    def timed_phase1(*a, **k):
        sync(device)
        start = time.perf_counter()
        phase1(*a, **k)
        sync(device)
        phase1_seconds.append(time.perf_counter() - start)

    two_pass._strategy._phase1 = timed_phase1  # instrumentation of the benchmark's own instance
    forum = forum_model(base)
    forum_opt = optimizer_for(forum)
    forum_fast = fast(forum)
    steps = {"full batch": full_step,
             "plain accumulation": plain_step(plain_fast, optimizer_for(plain), x, y, loss_fn, splits),
             PLAIN_CHANNELS_LAST: plain_step(fast(plain_cl), optimizer_for(plain_cl), x_cl, y, loss_fn, splits),
             "autobatch two_pass": lambda: two_pass.step(x, y),
             GIVEN_FORMAT: lambda: wrapped["given"].step(x, y),
             "autobatch micro": lambda: wrapped["micro"].step(x, y),
             "forum Python BatchNorm": lambda: forum_step(forum_fast, forum_opt, x, y, loss_fn, len(splits))}
    arms = [arm for arm in ARMS if not (args.channels_last and arm == PLAIN_CHANNELS_LAST)]
    times = interleaved_times({arm: steps[arm] for arm in arms}, args.rounds, args.warmup, device)
    medians = {arm: statistics.median(values) for arm, values in times.items()}
    phase1 = statistics.median(phase1_seconds[args.warmup:])
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''})")
    layout = ("channels_last" if args.channels_last else "NCHW") + (", torch.compile" if args.compile else "")
    lines = [f"## {args.model} at {args.size}x{args.size} ({layout}), logical batch {args.target_batch}, "
             f"micro-batches {splits}",
             "", f"`python bench/cost.py --model {args.model} --size {args.size} --micro-batch {args.micro_batch} "
                 f"--rounds {args.rounds} --device {args.device}{' --channels-last' if args.channels_last else ''}"
                 f"{' --compile' if args.compile else ''}` "
                 f"on {name}; "
             f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up rounds.", "",
             "| arm | time / plain accumulation |" + (" median step |" if device.type == "cuda" else ""),
             "| --- | --- |" + (" --- |" if device.type == "cuda" else "")]
    for arm in arms:
        cell = f" {medians[arm] * 1000:.1f} ms |" if device.type == "cuda" else ""
        lines.append(f"| {arm} | {medians[arm] / medians['plain accumulation']:.2f}x |{cell}")
    lines += ["", f"Phase 1 is {phase1 / medians['autobatch two_pass']:.0%} of a two_pass step "
                  f"({phase1 / medians['plain accumulation']:.2f}x of a plain accumulation step's time); it ran "
                  f"in {two_pass._strategy.layout.memory_format} (autobatch.batchnorm.layout's measurement).", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        path = pathlib.Path(args.out)
        path.write_text((path.read_text() + "\n" if path.exists() else "") + text)


if __name__ == "__main__":
    main()
