"""autobatch beside what a user would pick instead, on the same models under the same memory cap.

    python bench/peers.py                  # writes bench/results/peers.md (CPU, an emulated allocator cap)
    python bench/peers.py --device cuda --out bench/results/peers_cuda.md    # the allocator capped

The arms, each training 20 logical batches of 32 samples under one cap (an out-of-memory error when the
live tensor bytes pass it, the emulated allocator of bench/variable_shapes.py):

- autobatch: ``wrap(..., micro_batch="auto")``: the planner's trials, then the memory model per batch.
- Accelerate: its own ``find_executable_batch_size`` decorator (imported, run for real) around a loop of
  plain gradient accumulation that keeps the recipe's batch of 32 (micro-batches of the size it tries); an
  out-of-memory error anywhere restarts the whole loop at 0.9 times the size, from scratch.
- Trainer: the Hugging Face Trainer's ``auto_find_batch_size`` is that decorator around its training loop,
  with the size it finds as the batch (``per_device_train_batch_size``): the effective batch changes. Run
  here as the same decorator around a loop whose batch is the size it tries.
- Lightning: ``BatchSizeFinder`` (mode "power"), reimplemented here (it needs a Trainer and a
  LightningModule): 3 steps at 2, 4, 8... samples until one runs out of memory, then training with the
  last size that fit as the batch; an out-of-memory error later is not recovered (training stops).

Per arm: the size chosen (at the first batch) against the true largest (found by bisection with real steps
under the cap), the steps spent searching (and steps lost to restarts), out-of-memory events, the seconds
to the first training step, the effective batch it trains with, and samples per second over the whole run
as a ratio to autobatch's. Five workloads: the demo U-Net; a BatchNorm CNN on images of one size and of 16 to 96 pixels; an
attention encoder on sequences of one length and of 16 to 256 tokens.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import pathlib
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import autobatch  # noqa: E402
from autobatch.demo import UNet, models, shapes  # noqa: E402
from autobatch.planning import measure  # noqa: E402
from variable_shapes import Capped, Counter  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "peers.md"
TARGET = 32
ce = nn.CrossEntropyLoss()


class OutOfMemory(torch.OutOfMemoryError):
    """The emulated allocator's error, worded as CUDA's (Accelerate recognises " out of memory.")."""


class Cap(Capped):
    def _see(self, tensor):
        try:
            super()._see(tensor)
        except torch.OutOfMemoryError as error:
            raise OutOfMemory(f"CUDA out of memory. ({error})") from None


class Workload:
    """A model, its loss and 20 logical batches (inputs, targets), under one cap."""

    def __init__(self, name: str, make_model: Callable[[], nn.Module], loss_fn: Callable, batches: list, cap: int):
        self.name, self.make_model, self.loss_fn, self.batches, self.cap = name, make_model, loss_fn, batches, cap


def images(name: str, sizes: list[int]) -> Workload:
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(TARGET, 3, s, s, generator=generator), torch.randint(0, 5, (TARGET,), generator=generator))
               for s in sizes]
    return Workload(name, models.two_conv_net, ce, batches, 40 * 2**20)


def segmentation(name: str) -> Workload:
    """The demo's U-Net on its shapes, 48x48, masks per pixel."""
    images, masks = shapes(TARGET * 20, size=48, seed=0)
    batches = list(zip(images.split(TARGET), masks.long().split(TARGET)))
    return Workload(name, UNet, ce, batches, 48 * 2**20)


def sequences(name: str, lengths: list[int]) -> Workload:
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(1, 50, (TARGET, n), generator=generator), torch.randint(0, 50, (TARGET, n), generator=generator))
               for n in lengths]
    # Every sequence of a batch has its length: the mean over tokens is the mean over samples.
    loss = lambda logits, labels: ce(logits.flatten(0, 1), labels.flatten())  # noqa: E731
    return Workload(name, models.AttentionEncoder, loss, batches, 8 * 2**20)


#: The workload being run (a benchmark script's state; each arm reads its model and loss here).
W: Workload
DEVICE = torch.device("cpu")


def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = W.make_model().to(DEVICE)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def capped(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, cap: int) -> Any:
    """The emulated allocator on the host; on CUDA the real one, capped in main()."""
    if DEVICE.type == "cuda":
        return contextlib.nullcontext()
    return Cap(measure._resident(model, optimizer) + [t for t in batch if isinstance(t, torch.Tensor)], cap)


class Run:
    """What one arm did: counted as it trains."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first_step = None
        self.search_steps = self.lost_steps = self.events = self.samples = 0
        self.chosen = None
        self.effective = TARGET
        self.stopped = ""
        self.seconds = 0.0

    def trained(self, samples: int) -> None:
        if self.first_step is None:
            self.first_step = time.perf_counter() - self.start
        self.samples += samples


def plain_step(model, optimizer, x, y, micro: int) -> None:
    """Plain gradient accumulation of one batch in micro-batches of ``micro``, and the optimizer's step."""
    for xs, ys in zip(x.split(micro), y.split(micro)):
        (W.loss_fn(model(xs), ys) * len(xs) / len(x)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def true_largest(batch, cap: int) -> int:
    """The largest micro-batch whose real step (forward, backward, update) runs under the cap: bisection."""
    def fits(n: int) -> bool:
        model, optimizer = fresh()
        optimizer.zero_grad()
        try:
            with measure._eagerly(), capped(model, optimizer, batch, cap):
                plain_step(model, optimizer, batch[0][:n], batch[1][:n], n)
            with measure._eagerly(), capped(model, optimizer, batch, cap):  # the momentum now resident
                plain_step(model, optimizer, batch[0][:n], batch[1][:n], n)
            return True
        except torch.OutOfMemoryError:
            return False

    good, bad = 0, TARGET + 1
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def run_autobatch(batches, cap: int) -> Run:
    run = Run()
    model, optimizer = fresh()
    counter = Counter()
    logging.getLogger("autobatch").addHandler(counter)
    ab = autobatch.wrap(model, optimizer, TARGET, W.loss_fn, memory_budget=cap, cache=False, bn="micro")
    try:
        for x, y in batches:
            with measure._eagerly(), capped(model, optimizer, (x, y), cap):
                ab.step(x, y)
            if run.chosen is None:
                run.chosen = f"{ab.plan.capacity}, runs {ab.plan.micro_batch}"
            run.trained(len(x))
    finally:
        logging.getLogger("autobatch").removeHandler(counter)
    run.search_steps, run.events = ab._planner.trials.steps, counter.events
    run.seconds = time.perf_counter() - run.start
    return run


def run_accelerate(batches, cap: int, keep_batch: bool) -> Run:
    """Accelerate's decorator, for real, around the whole loop: plain accumulation at the recipe's batch
    (``keep_batch``), or the size it tries as the batch (the Trainer's auto_find_batch_size)."""
    from accelerate.utils import find_executable_batch_size

    run = Run()

    @find_executable_batch_size(starting_batch_size=TARGET)
    def loop(batch_size: int) -> None:
        run.chosen = run.chosen or batch_size
        model, optimizer = fresh()
        done = 0
        try:
            for x, y in batches:
                with measure._eagerly(), capped(model, optimizer, (x, y), cap):
                    if keep_batch:
                        plain_step(model, optimizer, x, y, batch_size)
                        run.trained(len(x))
                        done += 1
                    else:
                        for xs, ys in zip(x.split(batch_size), y.split(batch_size)):
                            plain_step(model, optimizer, xs, ys, batch_size)
                            run.trained(len(xs))
                            done += 1
        except torch.OutOfMemoryError:
            run.events += 1
            run.lost_steps += done
            run.samples = 0  # the loop starts over: what it trained is thrown away
            run.chosen = None
            raise

    loop()
    run.effective = TARGET if keep_batch else run.chosen
    run.seconds = time.perf_counter() - run.start
    return run


def run_lightning(batches, cap: int) -> Run:
    """BatchSizeFinder, mode "power", as Lightning runs it: 3 steps at 2, 4, 8... until out of memory, then the
    last size that fit, as the batch. A later out-of-memory error stops training."""
    run = Run()
    model, optimizer = fresh()
    x, y = batches[0]
    size, fitted = 2, None
    while size <= TARGET:
        try:
            with measure._eagerly(), capped(model, optimizer, (x, y), cap):
                for _ in range(3):
                    plain_step(model, optimizer, x[:size], y[:size], size)
                    run.search_steps += 1
            fitted, size = size, size * 2
        except torch.OutOfMemoryError:
            run.events += 1
            break
    run.chosen = run.effective = fitted
    model, optimizer = fresh()  # the finder restores the model's state before training
    try:
        for x, y in batches:
            with measure._eagerly(), capped(model, optimizer, (x, y), cap):
                for xs, ys in zip(x.split(fitted), y.split(fitted)):
                    plain_step(model, optimizer, xs, ys, fitted)
                    run.trained(len(xs))
    except torch.OutOfMemoryError:
        run.events += 1
        run.stopped = "stopped by out of memory"
    run.seconds = time.perf_counter() - run.start
    return run


ARMS: dict[str, Callable[..., Run]] = {
    "autobatch": run_autobatch,
    "Accelerate find_executable_batch_size, accumulation to 32": lambda b, c: run_accelerate(b, c, True),
    "Trainer auto_find_batch_size (the same decorator, its size as the batch)": lambda b, c: run_accelerate(b, c, False),
    "Lightning BatchSizeFinder, power (reimplemented)": run_lightning,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--rounds", type=int, default=3, help="runs of every arm, interleaved; the median is kept")
    parser.add_argument("--device", default="cpu", help="cpu (an emulated cap) or cuda (the allocator capped)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("autobatch").setLevel(logging.WARNING)
    global W
    workloads = [segmentation("demo U-Net, 48x48 segmentation"),
                 images("BatchNorm CNN, images 64x64", [64] * 20),
                 images("BatchNorm CNN, images 16 to 96 px",
                        [32, 64, 16, 96, 32, 16, 64, 96, 96, 32, 64, 16, 32, 96, 64, 16, 32, 64, 96, 32]),
                 sequences("attention encoder, 128 tokens", [128] * 20),
                 sequences("attention encoder, 16 to 256 tokens",
                           [64, 128, 16, 256, 32, 64, 200, 16, 128, 256, 48, 96, 160, 16, 256, 64, 128, 32, 224, 80])]
    rows = ["| workload | arm | size chosen (true largest at the first batch) | search steps | steps lost to restarts | out-of-memory "
            "events | time to the first step vs autobatch | effective batch | samples/s vs autobatch |", "|---" * 9 + "|"]
    for W in workloads:
        name, batches, cap = W.name, [tuple(t.to(DEVICE) for t in b) for b in W.batches], W.cap
        if DEVICE.type == "cuda":
            cap = max(cap, 256 * 2**20)  # the CUDA context and cuDNN workspaces hold some of it
            torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(DEVICE).total_memory)
        largest = true_largest(batches[0], cap)
        runs: dict[str, list[Run]] = {arm: [] for arm in ARMS}
        for round_ in range(args.rounds):
            order = list(ARMS)[round_ % len(ARMS):] + list(ARMS)[:round_ % len(ARMS)]
            for arm in order:
                runs[arm].append(ARMS[arm](batches, cap))
        speed = {arm: statistics.median(r.samples / r.seconds for r in rs) for arm, rs in runs.items()}
        for arm, rs in runs.items():
            r = rs[0]
            first = statistics.median(x.first_step for x in rs) if r.first_step is not None else None
            first_text = f"{first / statistics.median(x.first_step for x in runs['autobatch']):.2f}x" \
                if first is not None else "-"
            rows.append(f"| {name} | {arm} | {r.chosen} ({largest}) | {r.search_steps} | {r.lost_steps} | {r.events} | "
                        f"{first_text} | {r.effective}{' (' + r.stopped + ')' if r.stopped else ''} | "
                        f"{speed[arm] / speed['autobatch']:.2f}x |")
            print(rows[-1], flush=True)
    pathlib.Path(args.out).write_text(
        "# Side by side with the planners users pick instead\n\n"
        "`python bench/peers.py` (2-core CPU, host memory, an emulated allocator that raises out-of-memory when the "
        "live tensor bytes pass the cap: 48 MiB for the U-Net, 40 MiB for the CNN, 8 MiB for the attention encoder; the same cap is "
        "autobatch's `memory_budget`). 20 logical batches of 32 samples, SGD with momentum, bn=\"micro\" (the "
        "peers' plain accumulation's statistics) so that every arm computes the same gradient. Samples per second count only the "
        "samples each arm kept (a restart throws away what it trained), over the whole run: search, restarts and "
        f"training; times are medians of {args.rounds} interleaved runs of every arm, as ratios to autobatch's.\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
