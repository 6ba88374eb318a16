"""autobatch beside what a user would pick instead, on the same models under the same memory cap.

    python bench/peers.py                  # writes bench/results/peers.{md,png} (CPU, an emulated allocator cap)
    python bench/peers.py --device cuda --out bench/results/peers_cuda.md    # the allocator capped

The arms, each training 20 logical batches of 32 samples under one cap (an out-of-memory error when the
live tensor bytes pass it, the emulated allocator of bench/variable_shapes.py), every peer run for real:

- autobatch: ``wrap(..., micro_batch="auto")``: the planner's trials, then the memory model per batch.
- Accelerate: its own ``find_executable_batch_size`` decorator around a loop of plain gradient
  accumulation that keeps the recipe's batch of 32 (micro-batches of the size it tries); an
  out-of-memory error anywhere restarts the whole loop at 0.9 times the size, from scratch.
- Hugging Face Trainer: ``TrainingArguments(per_device_train_batch_size=32, auto_find_batch_size=True)``,
  ``Trainer.train()``: the same decorator around the Trainer's own loop, the size it finds as the batch.
- Lightning: a ``Trainer`` with the ``BatchSizeFinder`` callback (its defaults, mode "power": 3 steps at
  2, 4, 8... samples until one runs out of memory, then half that), then ``fit`` with the size it found as
  the batch; an out-of-memory error later is not recovered (training stops).

Both Trainers read the samples in order (a sequential sampler) through a collate that pads to the batch's
largest sample, so that their batches are the workload's. Per arm: the size chosen (at the first batch)
against the true largest (found by bisection with real steps under the cap), the steps spent searching
(and steps lost to restarts), out-of-memory events, the seconds to the first training step, the
effective batch it trains with, and samples per second over the whole run as a ratio to autobatch's.
Eight workloads: the demo U-Net; a BatchNorm CNN and a residual CNN on images of one size and of 16 to
96 pixels; an attention encoder on sequences of one length per batch (128, and 16 to 256 tokens), and on
padded batches of sequences of mixed lengths.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import pathlib
import sys
import tempfile
import textwrap
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import autobatch  # noqa: E402
from autobatch.demo import UNet, models, shapes  # noqa: E402
from autobatch.loss import IGNORE_INDEX  # noqa: E402
from autobatch.planning import measure  # noqa: E402
from variable_shapes import Capped  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "peers.md"
TARGET = 32
ce = nn.CrossEntropyLoss()


class OutOfMemory(torch.OutOfMemoryError):
    """The emulated allocator's error, worded as CUDA's (Accelerate and Lightning recognise it by its words)."""


#: Out-of-memory errors the emulated allocator raised, whoever caught them.
RAISED = [0]


class Cap(Capped):
    """Capped, but allocations under 1 KiB never fail: CUDA's caching allocator serves them from the small
    blocks it holds (Lightning allocates a scalar while the failed trial's tensors are still referenced)."""

    def _see(self, tensor):
        if tensor.untyped_storage().nbytes() < 1024:
            return measure._LiveBytes._see(self, tensor)
        try:
            super()._see(tensor)
        except torch.OutOfMemoryError as error:
            RAISED[0] += 1
            raise OutOfMemory(f"CUDA out of memory. ({error})") from None


def pad(tensors: list[torch.Tensor], value) -> torch.Tensor:
    """Stack samples padded at the end of every dimension to the largest, as a collate function does."""
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    out = torch.full([len(tensors), *shape], value, dtype=tensors[0].dtype)
    for row, t in zip(out, tensors):
        row[tuple(slice(0, n) for n in t.shape)] = t
    return out


class Workload:
    """A model, its loss and 20 logical batches (inputs, targets) of samples that a collate pads, under one cap.

    ``autobatch_loss``: the loss autobatch is given where it differs (a sum and its count, for padded tokens)."""

    def __init__(self, name: str, make_model: Callable[[], nn.Module], loss_fn: Callable, samples: list, cap: int,
                 target_pad=0, autobatch_loss: Callable = None):
        self.name, self.make_model, self.loss_fn, self.cap = name, make_model, loss_fn, cap
        self.samples, self.target_pad = samples, target_pad
        self.autobatch_loss = autobatch_loss or loss_fn
        self.batches = [self.collate(samples[i:i + TARGET]) for i in range(0, len(samples), TARGET)]

    def collate(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = zip(*samples)
        return pad(list(inputs), 0), pad(list(targets), self.target_pad)


def images(name: str, sizes: list[int], make_model=models.two_conv_net) -> Workload:
    generator = torch.Generator().manual_seed(0)
    samples = [(torch.randn(3, s, s, generator=generator), torch.randint(0, 5, (), generator=generator))
               for s in sizes for _ in range(TARGET)]
    return Workload(name, make_model, ce, samples, 40 * 2**20)


def segmentation(name: str) -> Workload:
    """The demo's U-Net on its shapes, 48x48, masks per pixel."""
    images, masks = shapes(TARGET * 20, size=48, seed=0)
    return Workload(name, UNet, ce, list(zip(images, masks.long())), 48 * 2**20)


def token_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The loss over the tokens that are not padding as a sum and its count: autobatch's exact mean over the
    whole batch's tokens."""
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum"), int((labels != IGNORE_INDEX).sum())


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over the micro-batch's tokens that are not padding, as users write it."""
    total, count = token_sum(logits, labels)
    return total / count


def sequences(name: str, lengths: list[int]) -> Workload:
    """Every sequence of a batch has the batch's length: the mean over tokens is the mean over samples."""
    generator = torch.Generator().manual_seed(0)
    samples = [(torch.randint(1, 50, (n,), generator=generator), torch.randint(0, 50, (n,), generator=generator))
               for n in lengths for _ in range(TARGET)]
    return Workload(name, models.AttentionEncoder, token_loss, samples, 8 * 2**20, target_pad=IGNORE_INDEX)


def padded_sequences(name: str) -> Workload:
    """Sequences of mixed lengths (most short, a few up to 256 tokens), each batch padded to its longest."""
    generator = torch.Generator().manual_seed(0)
    lengths = (16 + torch.empty(TARGET * 20).exponential_(1 / 40, generator=generator)).clamp(max=256).long()
    samples = [(torch.randint(1, 50, (int(n),), generator=generator),
                torch.randint(0, 50, (int(n),), generator=generator)) for n in lengths]
    return Workload(name, models.AttentionEncoder, token_loss, samples, 8 * 2**20, target_pad=IGNORE_INDEX,
                    autobatch_loss=token_sum)


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
    run, raised = Run(), RAISED[0]
    model, optimizer = fresh()
    ab = autobatch.wrap(model, optimizer, TARGET, W.autobatch_loss, memory_budget=cap, cache=False, bn="micro")
    try:
        for x, y in batches:
            with measure._eagerly(), capped(model, optimizer, (x, y), cap):
                ab.step(x, y)
            if run.chosen is None:
                run.chosen = f"{ab.plan.capacity}, runs {ab.plan.micro_batch}"
            run.trained(len(x))
    finally:
        run.events = RAISED[0] - raised  # trials' and steps' out-of-memory errors alike, recovered or not
    run.search_steps = ab._planner.setting.trials.steps
    run.seconds = time.perf_counter() - run.start
    return run


def run_accelerate(batches, cap: int) -> Run:
    """Accelerate's decorator, for real, around the whole loop: plain accumulation at the recipe's batch."""
    from accelerate.utils import find_executable_batch_size

    run, raised = Run(), RAISED[0]

    @find_executable_batch_size(starting_batch_size=TARGET)
    def loop(batch_size: int) -> None:
        run.chosen = run.chosen or batch_size
        model, optimizer = fresh()
        done = 0
        try:
            for x, y in batches:
                with measure._eagerly(), capped(model, optimizer, (x, y), cap):
                    plain_step(model, optimizer, x, y, batch_size)
                run.trained(len(x))
                done += 1
        except torch.OutOfMemoryError:
            run.lost_steps += done
            run.samples, run.first_step = 0, None  # the loop starts over: what it trained is thrown away
            run.chosen = None
            raise

    loop()
    run.events = RAISED[0] - raised
    run.seconds = time.perf_counter() - run.start
    return run


def _samples() -> list:
    """The workload's samples as a Trainer's dataset holds them, each its own tensor (none a view of a batch)."""
    return [tuple(t.clone().to(DEVICE) for t in sample) for sample in W.samples]


def under_cap(module: nn.Module, cap: int) -> contextlib.AbstractContextManager:
    """The whole of a Trainer's run under the cap: everything it allocates counts, as on a GPU (where the
    allocator itself is capped, in main())."""
    stack = contextlib.ExitStack()
    if DEVICE.type == "cpu":
        stack.enter_context(measure._eagerly())
        stack.enter_context(Cap(list(module.parameters()) + list(module.buffers()), cap))
    return stack


def run_hf_trainer(batches, cap: int) -> Run:
    """The Hugging Face Trainer with ``auto_find_batch_size=True``, for real."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    run, raised, pending, done = Run(), RAISED[0], [0], [0]

    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = fresh()[0]

        def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
            pending[0] = len(inputs)  # trained once the step ends
            return {"loss": W.loss_fn(self.net(inputs), targets)}

    class Count(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            run.chosen = run.chosen or args.per_device_train_batch_size
            run.samples, run.first_step = 0, None  # a restart throws away what the loop trained
            run.lost_steps += done[0]
            done[0] = 0

        def on_step_end(self, args, state, control, **kwargs):
            run.trained(pending[0])
            done[0] += 1

    class InOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def collate(samples):
        inputs, targets = W.collate([(s[0], s[1]) for s in samples])
        return {"inputs": inputs, "targets": targets}

    model = WithLoss()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, per_device_train_batch_size=TARGET, auto_find_batch_size=True,
                                 num_train_epochs=1, learning_rate=0.01, lr_scheduler_type="constant",
                                 report_to=[], save_strategy="no", logging_strategy="no", use_cpu=DEVICE.type == "cpu",
                                 remove_unused_columns=False, dataloader_pin_memory=False, disable_tqdm=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        trainer = InOrder(model=model, args=args, train_dataset=_samples(), data_collator=collate,
                          optimizers=(optimizer, None), callbacks=[Count()])
        with under_cap(model, cap):
            trainer.train()
    run.events = RAISED[0] - raised
    run.effective = trainer._train_batch_size
    run.chosen = f"{run.chosen} -> {run.effective}" if run.chosen != run.effective else run.effective
    run.seconds = time.perf_counter() - run.start
    return run


def run_lightning(batches, cap: int) -> Run:
    """Lightning's BatchSizeFinder (its defaults: "power" from 2) in a Trainer, then ``fit`` at the size it found.

    Its defaults, because ``max_val=32`` would make it train at 32 untried: it stops doubling when the next
    size reaches ``max_val`` and returns that size (Lightning 2.6)."""
    import lightning as L
    from lightning.pytorch.callbacks import BatchSizeFinder

    run, raised, found = Run(), RAISED[0], [False]
    samples = _samples()

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 2
            self.net = fresh()[0]

        def train_dataloader(self):
            return torch.utils.data.DataLoader(samples, batch_size=self.batch_size, shuffle=False,
                                               collate_fn=W.collate)

        def training_step(self, batch, batch_index):
            return W.loss_fn(self.net(batch[0]), batch[1])

        def on_train_batch_end(self, outputs, batch, batch_index):
            if found[0]:
                run.trained(len(batch[0]))
            else:
                run.search_steps += 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    class Found(L.Callback):
        """Lightning runs tuner callbacks first: at this one's on_fit_start the finder has chosen."""

        def on_fit_start(self, trainer, module):
            found[0] = True
            run.chosen = run.effective = module.batch_size

    module = Module()
    with tempfile.TemporaryDirectory() as folder:  # where the finder keeps the model while it searches
        trainer = L.Trainer(max_epochs=1, accelerator=DEVICE.type, devices=1, logger=False, default_root_dir=folder,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[BatchSizeFinder(mode="power"), Found()])
        try:
            with under_cap(module, cap):
                trainer.fit(module)
        except torch.OutOfMemoryError:
            run.stopped = "stopped by out of memory"
    run.events = RAISED[0] - raised
    run.seconds = time.perf_counter() - run.start
    return run


ARMS: dict[str, Callable[..., Run]] = {
    "autobatch": run_autobatch,
    "Accelerate find_executable_batch_size, accumulation to 32": run_accelerate,
    "Hugging Face Trainer, auto_find_batch_size": run_hf_trainer,
    "Lightning Trainer, BatchSizeFinder (power)": run_lightning,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--rounds", type=int, default=3, help="runs of every arm, interleaved; the median is kept")
    parser.add_argument("--device", default="cpu", help="cpu (an emulated cap) or cuda (the allocator capped)")
    parser.add_argument("--only", action="append", help="run the workloads whose name holds this (repeatable)")
    parser.add_argument("--replot", action="store_true", help="only draw the picture again from the table in --out")
    args = parser.parse_args()
    if args.replot:
        return replot(pathlib.Path(args.out))
    global DEVICE
    DEVICE = torch.device(args.device)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("autobatch").setLevel(logging.WARNING)
    for chatty in ("lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(chatty).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning|transformers|accelerate")
    global W
    sizes = [32, 64, 16, 96, 32, 16, 64, 96, 96, 32, 64, 16, 32, 96, 64, 16, 32, 64, 96, 32]
    workloads = [segmentation("demo U-Net, 48x48 segmentation"),
                 images("BatchNorm CNN, images 64x64", [64] * 20),
                 images("BatchNorm CNN, images 16 to 96 px", sizes),
                 images("residual CNN, images 64x64", [64] * 20, models.ResidualNet),
                 images("residual CNN, images 16 to 96 px", sizes, models.ResidualNet),
                 sequences("attention encoder, 128 tokens", [128] * 20),
                 sequences("attention encoder, 16 to 256 tokens",
                           [64, 128, 16, 256, 32, 64, 200, 16, 128, 256, 48, 96, 160, 16, 256, 64, 128, 32, 224, 80]),
                 padded_sequences("attention encoder, padded batches of 16 to 256 tokens")]
    workloads = [w for w in workloads if not args.only or any(part in w.name for part in args.only)]
    figures: dict[str, dict[str, tuple[float, int]]] = {}
    rows = ["| workload | arm | size chosen (true largest at the first batch) | search steps | steps lost to restarts "
            "| out-of-memory events | time to the first step vs autobatch | effective batch | samples/s vs autobatch |",
            "|---" * 9 + "|"]
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
            figures.setdefault(name, {})[arm] = (speed[arm] / speed["autobatch"], r.events)
            print(rows[-1], flush=True)
    out = pathlib.Path(args.out)
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "2-core CPU, host memory"
    out.write_text(
        "# Side by side with the planners users pick instead\n\n"
        f"`python bench/peers.py{' --device cuda' if DEVICE.type == 'cuda' else ''}` ({where}, "
        "an emulated allocator that raises out-of-memory when the live tensor bytes pass the cap: 48 MiB for the "
        "U-Net, "
        "40 MiB for the CNNs, 8 MiB for the attention encoder; the same cap is autobatch's `memory_budget`; "
        f"torch {torch.__version__.split('+')[0]}, Accelerate {_version('accelerate')}, transformers "
        f"{_version('transformers')}, Lightning {_version('lightning')}). 20 logical batches of 32 samples, SGD with "
        "momentum, bn=\"micro\" (the peers' plain accumulation's statistics). Every peer runs for real: Accelerate's "
        "decorator around plain accumulation to 32, the Hugging Face Trainer with `auto_find_batch_size=True`, a "
        "Lightning Trainer with `BatchSizeFinder()` (mode \"power\"); both Trainers read the samples in "
        "order, padded to each batch's largest. The padded-sequence workload gives autobatch the tokens' sum and "
        "count (its exact mean over the batch's tokens) and the peers the mean over each micro-batch's tokens, as "
        "users write it; elsewhere every arm computes the same gradient. Out-of-memory events are the errors "
        "the allocator raised in the run, searches included. Samples per second count only the samples each arm "
        "kept (a restart throws away what it trained), over the whole run: search, restarts and training; times are "
        f"medians of {args.rounds} interleaved runs of every arm, as ratios to autobatch's.\n\n"
        f"![samples per second and out-of-memory events per arm and workload]({out.with_suffix('.png').name})\n\n"
        + "\n".join(rows) + "\n")
    plot(figures, out.with_suffix(".png"))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def plot(figures: dict, path: pathlib.Path) -> None:
    """Two panels: samples per second as a ratio to autobatch's, and out-of-memory events, per workload."""
    from autobatch.plot import pyplot

    plt = pyplot()
    names = list(figures)
    arms = list(next(iter(figures.values())))
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    figure, (speed, events) = plt.subplots(1, 2, figsize=(8, 1.2 + 0.8 * len(names)), sharey=True,
                                           gridspec_kw={"width_ratios": [3, 2]})
    height = 0.8 / len(arms)
    for index, arm in enumerate(arms):
        rows = [r - 0.4 + height * (index + 0.5) for r in range(len(names))]
        speed.barh(rows, [figures[n][arm][0] for n in names], height, color=colours[index], label=arm)
        events.barh(rows, [figures[n][arm][1] for n in names], height, color=colours[index])
    speed.set_yticks(range(len(names)), [textwrap.fill(n.replace(",", ""), 22) for n in names])
    speed.invert_yaxis()
    speed.axvline(1.0, color="black", linewidth=0.8)
    speed.set_xlabel("samples/s (autobatch = 1)")
    events.set_xlabel("out-of-memory errors")
    figure.legend(loc="lower center", ncol=1, frameon=False)
    figure.tight_layout(rect=(0, 1.2 / (1.2 + 0.8 * len(names)), 1, 1))
    figure.savefig(path, dpi=110)


def replot(table: pathlib.Path) -> None:
    """Draw the picture again from the table a run wrote."""
    figures: dict[str, dict[str, tuple[float, int]]] = {}
    for line in table.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 9 and cells[8].endswith("x") and cells[0] != "workload":
            figures.setdefault(cells[0], {})[cells[1]] = (float(cells[8][:-1]), int(cells[5]))
    plot(figures, table.with_suffix(".png"))


if __name__ == "__main__":
    main()
