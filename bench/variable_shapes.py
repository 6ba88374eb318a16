"""Batches whose samples change size: the plan measured once (the micro-batch of the first batch, for
every batch) against the memory model (a micro-batch per batch), on the host with an emulated
allocator that runs out of memory at the cap, as a GPU would.

    python bench/variable_shapes.py                  # writes bench/results/variable_shapes.md
    python bench/variable_shapes.py --device cuda    # a real allocator capped (set_per_process_memory_fraction)

Two runs of 20 logical batches each, the sizes in a fixed random order: a two-convolution BatchNorm
net on images of 16 to 96 pixels, and an attention encoder on padded sequences of 16 to 256 tokens.
Per arm: out-of-memory events (each redoes its batch), trial steps, samples per second, and every
step's peak over the cap. "Plan once" is what autobatch did before it followed the samples: its
planner answers every batch with the first batch's plan (and a shrunken one after running out of
memory), patched in here, never in autobatch.
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
from autobatch.demo import models  # noqa: E402
from autobatch.planning import measure  # noqa: E402
from autobatch.planning.planner import Planner  # noqa: E402
from autobatch.sizes import format_bytes  # noqa: E402
from autobatch.split import balanced_parts  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "variable_shapes.md"


class Capped(measure._LiveBytes):
    """The host's tensor bytes, followed as the planner follows them, with an allocator that fails past ``cap``."""

    def __init__(self, known, cap):
        self.cap = cap
        super().__init__(known)

    def _see(self, tensor):
        before = self.live
        super()._see(tensor)
        if self.live > max(before, self.cap):  # a new allocation past the cap (a copy into a tensor allocates none)
            raise torch.OutOfMemoryError(f"emulated allocator: {format_bytes(self.live)} past the cap")


class Counter(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.events = 0

    def emit(self, record):
        self.events += "ran out of memory" in record.getMessage()


def image_run():
    sizes = [32, 64, 16, 96, 32, 16, 64, 96, 96, 32, 64, 16, 32, 96, 64, 16, 32, 64, 96, 32]
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 3, s, s, generator=generator), torch.randint(0, 5, (32,), generator=generator))
               for s in sizes]

    def model():
        torch.manual_seed(0)
        return models.two_conv_net()

    loss = lambda model, b: nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
    return "two-conv BatchNorm net, images of 16 to 96 pixels", model, loss, batches, 32, 40 * 2**20


def sequence_run():
    lengths = [64, 128, 16, 256, 32, 64, 200, 16, 128, 256, 48, 96, 160, 16, 256, 64, 128, 32, 224, 80]
    generator = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(1, 50, (32, n), generator=generator),
                "labels": torch.randint(0, 50, (32, n), generator=generator)} for n in lengths]

    def model():
        torch.manual_seed(0)
        return models.AttentionEncoder()

    def loss(model, batch):
        logits = model(batch["tokens"])
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum"), \
            batch["labels"].numel()

    return "attention encoder, sequences of 16 to 256 tokens", model, loss, batches, 32, 8 * 2**20


def cuda_step(ab, batch, device):
    """One step on the GPU, the allocator capped: its peak (the allocator's), real out-of-memory recovered."""
    torch.cuda.reset_peak_memory_stats(device)
    ab.step(batch)
    return torch.cuda.max_memory_allocated(device)


def train(make_model, loss, batches, target, cap, plan_once, device=torch.device("cpu")):
    original = Planner.next
    if plan_once:  # the baseline: the start's plan (and what running out of memory makes of it) for every batch
        Planner.next = lambda self, batch: original(self, batch) if self.state.plan is None else (self.state.plan, False)
    counter = Counter()
    logging.getLogger("autobatch").addHandler(counter)
    try:
        model = make_model().to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        ab = autobatch.wrap(model, optimizer, target, compute_loss=loss, memory_budget=cap, cache=False,
                            bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format))
        if device.type == "cuda":
            batches = [ab._micro.batches.to(batch, device) for batch in batches]
            torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(device).total_memory,
                                                       device)
        peaks, start = [], time.perf_counter()
        for batch in batches:
            if device.type == "cuda":
                peaks.append(cuda_step(ab, batch, device))
                continue
            # Each step under the emulated allocator, which also measures its peak.
            tracker = Capped(measure._resident(model, optimizer) + ab._micro.batches.tensors(batch), cap)
            with measure._eagerly(), tracker:
                ab.step(batch)
            peaks.append(tracker.peak - sum(t.untyped_storage().nbytes() for t in ab._micro.batches.tensors(batch)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        Planner.next = original
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        logging.getLogger("autobatch").removeHandler(counter)
    return {"events": counter.events, "trials": ab._planner.setting.trials.steps, "seconds": seconds,
            "samples": sum(ab._micro.batches.size(b) for b in batches), "peaks": [p / cap for p in peaks]}


def largest_that_fits(make_model, compute_loss, batch, budget, target, phase1_chunks=1):
    """The largest micro-batch that runs (the largest of a step's balanced splits) whose real step peaks
    within ``budget`` on the host, measured for every number of micro-batches from one up."""
    for count in range(1, target + 1):
        largest = max(balanced_parts(target, count))
        model = make_model()
        ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), target,
                            compute_loss=compute_loss, micro_batch=largest,
                            bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format))
        ab.plan = ab.plan.replace(phase1_chunks=phase1_chunks)
        ab.step(batch)  # the momentum buffers, resident in every later step
        peak = measure.peak_bytes(lambda: ab.step(batch), torch.device("cpu"), model, ab.optimizer,
                                  ab._micro.batches.tensors(batch))
        if peak <= budget:
            return largest
    return 0


#: #39's sequence: the largest size first, then sizes inside the measured range, then those sizes again.
WARM_SIZES = [96, 16, 64, 80, 48, 96, 48, 64, 80]


#: The budgets of the warm-up table: the runs' cap, and two where phase 1 and the micro-batches split more.
WARM_CAPS = [40 * 2**20, 20 * 2**20, 12 * 2**20]


def warm_rows():
    return [row for cap in WARM_CAPS for row in warm_rows_at(cap)]


def warm_rows_at(cap):
    """After warm-up, each size inside the measured range against the largest micro-batch that fits there."""
    _, make_model, loss, _, target, _ = image_run()
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 3, s, s, generator=generator), torch.randint(0, 5, (32,), generator=generator))
               for s in WARM_SIZES]
    model = make_model()
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), target, compute_loss=loss,
                        memory_budget=cap, cache=False, bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format))
    chosen = []
    for batch in batches:
        ab.step(batch)
        chosen.append((ab.plan.micro_batch, ab.plan.phase1_chunks))
    rows = []
    for index in range(6, len(WARM_SIZES)):  # the second visit of each size
        (micro_batch, chunks), size = chosen[index], WARM_SIZES[index]
        best = largest_that_fits(make_model, loss, batches[index], ab.plan.budget_bytes, target, chunks)
        rows.append(f"| {format_bytes(cap)} | {size} px | {micro_batch} | {best} | {micro_batch / best:.2f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--table", choices=("runs", "warm"), default="runs",
                        help="warm: after warm-up, the micro-batch chosen at sizes inside the measured range against "
                             "the largest that fits (bench/results/variable_shapes_warm.md)")
    args = parser.parse_args()
    if args.table == "warm":
        logging.basicConfig(level=logging.ERROR)
        rows = warm_rows()
        RESULTS.with_name("variable_shapes_warm.md").write_text(
            "# After warm-up: sizes inside the measured range\n\n`python bench/variable_shapes.py --table warm` (2-core "
            "CPU, host memory, two-conv BatchNorm net, batches of 32, bn=two_pass). Sizes in the order "
            f"{WARM_SIZES}; each size's second step against the largest micro-batch whose real step fits the planner's "
            "budget (its 10% margin kept) with phase 1 in as many chunks as that step ran, measured step by step.\n\n"
            "| memory_budget | size | micro-batch chosen | largest that fits | ratio |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
        return
    device = torch.device(args.device)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("autobatch").setLevel(logging.WARNING)  # the out-of-memory warnings, counted
    rows = ["| run | arm | out-of-memory events (batches redone) | trial steps | samples/s | largest peak / cap (a failed attempt passes 1) | "
            "mean peak / cap |", "|---|---|---|---|---|---|---|"]
    for name, make_model, loss, batches, target, cap in (image_run(), sequence_run()):
        if device.type == "cuda":
            cap = max(cap, 64 * 2**20)  # the CUDA context and cuDNN workspaces hold a few tens of MiB
        results = {arm: train(make_model, loss, batches, target, cap, arm == "plan once", device)
                   for arm in ("plan once", "memory model")}
        speed = {arm: r["samples"] / r["seconds"] for arm, r in results.items()}
        for arm, r in results.items():
            rows.append(f"| {name}, cap {format_bytes(cap)} | {arm} | {r['events']} | {r['trials']} | "
                        f"{speed[arm]:.0f} ({speed[arm] / speed['plan once']:.2f}x) | {max(r['peaks']):.2f} | "
                        f"{sum(r['peaks']) / len(r['peaks']):.2f} |")
            print(rows[-1], flush=True)
        print("peaks / cap per step:", {arm: [round(p, 2) for p in r["peaks"]] for arm, r in results.items()})
    where = (f"on {torch.cuda.get_device_name(device)}, the allocator capped with set_per_process_memory_fraction"
             if device.type == "cuda" else "2-core CPU, host memory, an emulated allocator that raises out-of-memory "
                                           "when the live tensor bytes pass the cap")
    pathlib.Path(args.out).write_text(
        "# Batches whose samples change size: plan once against the memory model\n\n"
        f"`python bench/variable_shapes.py --device {args.device}` ({where}; the cap is also `memory_budget`). 20 logical "
        "batches of 32 samples per run, sizes in a fixed random order. Samples per second include planning, "
        "trials and redone batches, side by side in one run; the ratio is to plan once.\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
