"""The time of a precise step (the default's exact gradient in micro-batches) against plain accumulation, side by
side in one run, on the stock models of issue 38's cost targets.

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm -e .
    /tmp/tv/bin/python bench/precise_cost.py          # ~6 min on 2 CPU cores: bench/results/precise_cost.md
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 \
        /tmp/tv/bin/python bench/precise_cost.py --append # the same, freed memory kept by the C allocator
    /tmp/tv/bin/python bench/precise_cost.py --models "timm resnet50" --rounds 5      # printed only

Per model, float32, a logical batch of 16 images of 64x64 in micro-batches of 4 (given), random weights:
- plain accumulation: the model called on each micro-batch, the losses weighted by their samples (not the full
  batch's gradient: the reference for time);
- precise, whole segments: ``autobatch.wrap`` with its defaults (``bn="auto"``, which runs two_pass with the
  precise backward at a given micro-batch) where its first, measured step left room to keep every boundary and
  to recompute each segment for the whole batch at once;
- precise, every boundary: the same step recomputing segments micro-batch by micro-batch (what the planner
  takes where a whole segment's tensors do not fit);
- precise, grouped: keeping only what crosses groups of segments (what the planner keeps where memory is
  short), which recomputes each group's inner boundary: one more forward;
- two_pass, projected: ``bn="two_pass"``, the approximate backward the default replaced.

Arms run interleaved, in a new random order each round, after warm-up rounds; each round's time of an arm is
divided by plain accumulation's in the same round, and the median of those ratios is reported with their middle
half (this 2-core machine's speed drifts between rounds more than between the arms of one). Each arm's peak
memory (live tensors, autobatch's host tracker) is measured once, after the timed rounds.

On the host, glibc's malloc gives large freed blocks back to the system, and every step that allocates them
again pays a page fault per 4 KiB (measured on timm resnet50: plain accumulation 0 per step, the projected
two_pass 23,000, precise 39,000: its whole-batch tensors and every autobatch step's undo copies). A GPU's
caching allocator keeps freed memory, as PyTorch's CPU tuning guide has jemalloc or tcmalloc do; the
``MALLOC_*`` variables above make glibc keep it (blocks up to 32 MiB), and the results say which ran.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import pathlib
import platform
import statistics
import sys

import timm
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autobatch  # noqa: E402
from autobatch.modes import Boundaries  # noqa: E402
from autobatch.planning.measure import peak_bytes  # noqa: E402
from autobatch.sizes import format_bytes  # noqa: E402
from autobatch.split import balanced_splits  # noqa: E402
from bench.cost import interleaved_times, plain_step  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "precise_cost.md"


def _lraspp():
    return torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                      num_classes=5)


#: name: (factory, task, the issue's target ratio)
MODELS = {
    "timm mobilenetv3_large_100": (lambda: timm.create_model("mobilenetv3_large_100", num_classes=10), "classify",
                                   2.0),
    "torchvision lraspp_mobilenet_v3_large": (_lraspp, "segment", 2.0),
    "timm resnet50": (lambda: timm.create_model("resnet50", num_classes=10), "classify", 1.7),
}


def classify_loss(output, target):
    return F.cross_entropy(output, target)


def segment_loss(output, target):
    return F.cross_entropy(output["out"], target)


def problem(name: str, batch: int, size: int):
    factory, task, target = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(batch, 3, size, size)
    if task == "classify":
        return model, x, torch.randint(0, 10, (batch,)), classify_loss, target
    return model, x, torch.randint(0, 5, (batch, size, size)), segment_loss, target


def arms(name: str, args: argparse.Namespace) -> tuple[dict, dict, float]:
    """Each arm's step (with its model and optimizer), autobatch's where it runs it, the batch and the target."""
    base, x, y, loss_fn, target = problem(name, args.target_batch, args.size)
    splits = balanced_splits(args.target_batch, args.micro_batch)

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    plain = copy.deepcopy(base)
    plain_opt = sgd(plain)
    steps = {"plain accumulation": (plain_step(plain, plain_opt, x, y, loss_fn, splits), plain, plain_opt)}
    plans = {}
    for arm, bn in (("precise, whole segments", "auto"), ("precise, every boundary", "auto"),
                    ("precise, grouped", "auto"),
                    ("two_pass, projected", "two_pass")):
        model = copy.deepcopy(base)
        optimizer = sgd(model)
        ab = autobatch.wrap(model, optimizer, args.target_batch, loss_fn, micro_batch=args.micro_batch, bn=bn,
                            cache=False)
        ab.step(x, y)  # the first step is measured: it chooses the boundaries
        # The benchmark's own instances of what the planner takes where memory is shorter.
        forced = {"precise, every boundary": Boundaries.EVERY, "precise, grouped": Boundaries.GROUPED}
        if arm in forced:
            planner = ab._planner
            planner.state.plan = planner.state.plan.replace(boundaries=forced[arm], boundary_bytes=0)
        steps[arm] = ((lambda ab: lambda: ab.step(x, y))(ab), model, optimizer)
        plans[arm] = ab
    return steps, plans, (x, y), target


def run(name: str, args: argparse.Namespace) -> list[str]:
    steps, plans, data, target = arms(name, args)
    times = interleaved_times({arm: step for arm, (step, _, _) in steps.items()}, args.rounds, args.warmup)
    rows = []
    for arm, (step, model, optimizer) in steps.items():
        peak = peak_bytes(step, torch.device("cpu"), model, optimizer, data)
        ab = plans.get(arm)
        kept = {Boundaries.WHOLE_SEGMENTS: "every boundary kept, whole segments recomputed",
                Boundaries.EVERY: "every boundary kept", Boundaries.GROUPED: "the grouped boundaries kept"}
        plan = "-" if ab is None else f"{ab.plan.gradient}; {kept[ab.plan.boundaries]}" \
            if ab.plan.gradient.startswith("precise") else ab.plan.gradient
        # Each round's ratio to plain accumulation's time in the same round: this machine's speed drifts between
        # rounds far more than between two arms of one round.
        ratios = [t / plain for t, plain in zip(times[arm], times["plain accumulation"])]
        low, _, high = statistics.quantiles(ratios, n=4)
        goal = f", target <= {target}x" if arm == "precise, whole segments" else ""
        spread = "" if arm == "plain accumulation" else f" ({low:.2f}x to {high:.2f}x{goal})"
        rows.append(f"| {name} | {arm} | {statistics.median(ratios):.2f}x{spread} | {format_bytes(peak)} | {plan} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS), metavar="MODEL")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--target-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--append", action="store_true", help="add this run's table to the results file")
    args = parser.parse_args()
    logging.getLogger("autobatch").setLevel(logging.ERROR)
    rows = [row for name in args.models for row in run(name, args)]
    threads = torch.get_num_threads()
    malloc = " ".join(f"{key}={value}" for key, value in sorted(os.environ.items()) if key.startswith("MALLOC_"))
    allocator = (f"glibc malloc with {malloc}: freed memory kept, as a GPU's caching allocator keeps it" if malloc
                 else "glibc malloc's defaults: freed memory given back to the system")
    lines = [
        f"## {allocator}", "",
        f"`{malloc + ' ' if malloc else ''}python bench/precise_cost.py"
        f"{'' if args.models == list(MODELS) else ' --models ...'}` on CPU "
        f"({platform.processor() or platform.machine()}, {threads} threads), torch {torch.__version__}, timm "
        f"{timm.__version__}, torchvision {torchvision.__version__}; float32, {args.target_batch} images of "
        f"{args.size}x{args.size} in micro-batches of {args.micro_batch}; {args.rounds} interleaved rounds after "
        f"{args.warmup} warm-up rounds: the median of each round's ratio to plain accumulation's time in that round, "
        "in brackets the middle half of them (first to third quartile). Peak: live tensors "
        "during one more step (parameters, gradients and inputs included), autobatch's host tracker.", "",
        "| model | arm | time / plain accumulation (middle half) | peak | gradient |",
        "| --- | --- | --- | --- | --- |", *rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.models == list(MODELS):
        header = "# Precise's cost: the default's exact gradient against plain accumulation\n\n"
        RESULTS.write_text((RESULTS.read_text() + "\n" if args.append and RESULTS.exists() else header) + text)


if __name__ == "__main__":
    main()
