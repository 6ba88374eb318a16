"""Training fidelity on real data: scikit-learn's handwritten digits, two BatchNorm networks.

    pip install -e ".[bench]"          # matplotlib, and scikit-learn, which ships the digits
    python bench/fidelity_real.py     # ~60 min on 2 CPU cores; writes bench/results/fidelity_real.{md,json,png}

The digits (1,797 8x8 images, 10 classes) ship inside scikit-learn: nothing is downloaded. Two
models: ``resnet``, a residual CNN (7 BatchNorm2d), and ``bn1d-head``, a VGG-style CNN whose
classifier has a BatchNorm1d on pooled features (the layer that sees fewest values per channel).
From the same initial weights and batch order per seed, each trains with a logical batch of 16
(SGD, momentum 0.9) as: the full batch (the reference), plain accumulation (each micro-batch its
own statistics, running statistics updated per micro-batch), autobatch ``micro``, and autobatch
``two_pass`` with three phase-2 backwards, at 2, 4 and 8 splits:

- ``two_pass``: what autobatch ships: the fused kernel fed the micro-batch's mean and the full
  batch's invstd (``xhat`` centred in the micro-batch; shift-invariant);
- ``two_pass, uncentred``: the backward before this benchmark: the kernel fed the full batch's
  mean and invstd (not shift-invariant: a constant shift of the layer's input gets a gradient);
- ``two_pass, centred (b)``: ``g - mean_k(g) - xc * mean_k(g * xhat)``, centred ``xc`` with the
  uncentred projection coefficient (also shift-invariant; one more elementwise pass).

Reported per arm, mean ± sd over seeds: test accuracy and training loss in eval mode (running
statistics) after the last epoch, and the cosine of the arm's gradient to the true full-batch
gradient at checkpoints along the full-batch trajectory.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autobatch  # noqa: E402
import autobatch.batchnorm.full_batch as full_batch  # noqa: E402
from autobatch.reference import cosine, flat_grad, full_batch_grad, plain_accumulation_backward  # noqa: E402
from autobatch.split import balanced_splits  # noqa: E402

TARGET = 16
ARMS = ("plain accumulation", "autobatch micro", "two_pass, uncentred", "two_pass, centred (b)", "two_pass")
ce = nn.CrossEntropyLoss()


class ResNet(nn.Module):
    """Stem conv + BN, three residual blocks (one strided), pooled linear head: 7 BatchNorm2d."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList([self._block(width, width, 1), self._block(width, 2 * width, 2),
                                     self._block(2 * width, 2 * width, 1)])
        self.shortcut = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False), nn.BatchNorm2d(2 * width))
        self.fc = nn.Linear(2 * width, 10)

    @staticmethod
    def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.blocks[0](x))
        x = F.relu(self.shortcut(x) + self.blocks[1](x))
        x = F.relu(x + self.blocks[2](x))
        return self.fc(x.mean((2, 3)))


class Bn1dHead(nn.Module):
    """VGG-style: conv(bias) + BN + ReLU twice, pooling, then Linear + BatchNorm1d + ReLU + Linear."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * width, 64), nn.BatchNorm1d(64), nn.ReLU(),
                                  nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x))


MODELS = {"resnet": ResNet, "bn1d-head": Bn1dHead}


class _UncentredBackward(torch.autograd.Function):
    """The phase-2 backward autobatch had before: the kernel fed the full batch's mean and invstd."""

    @staticmethod
    def forward(ctx, input, weight, bias, mean, invstd, var, eps, micro_mean):
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.eps = eps
        return torch.batch_norm(input, weight, bias, mean, var, False, 0.0, eps, False)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        grads = torch.ops.aten.native_batch_norm_backward(grad_output, input, weight, None, None, mean, invstd,
                                                          True, ctx.eps, [True, weight is not None, True])
        return grads[0], grads[1], grads[2], None, None, None, None, None


class _CentredBBackward(_UncentredBackward):
    """``gamma * invstd * (g - mean_k(g) - xc * mean_k(g * xhat))`` with ``xc`` centred in the micro-batch."""

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        dims = [0] + list(range(2, input.dim()))
        shape = (1, -1) + (1,) * (input.dim() - 2)
        xhat = (input - mean.view(shape)) * invstd.view(shape)
        xc = xhat - xhat.mean(dims, keepdim=True)
        g = grad_output
        grad_input = (weight.view(shape) * invstd.view(shape)) * (
            g - g.mean(dims, keepdim=True) - xc * (g * xhat).mean(dims, keepdim=True))
        return grad_input, (g * xhat).sum(dims), g.sum(dims), None, None, None, None, None


BACKWARDS = {"two_pass, uncentred": _UncentredBackward, "two_pass, centred (b)": _CentredBBackward}


@contextlib.contextmanager
def backward_of(arm: str):
    """Phase 2 with the arm's backward in place of the shipped one (bench only)."""
    shipped = full_batch._ProjectedBatchNorm
    full_batch._ProjectedBatchNorm = BACKWARDS.get(arm, shipped)
    try:
        yield
    finally:
        full_batch._ProjectedBatchNorm = shipped


def bn_mode(arm: str) -> str:
    return "micro" if arm == "autobatch micro" else "two_pass"


def arm_grad(arm, model, x, y, splits):
    model = copy.deepcopy(model)
    if arm == "plain accumulation":
        plain_accumulation_backward(model, x, y, ce, splits)
        return flat_grad(model)
    grads = []
    with backward_of(arm):
        autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0), len(x), ce, micro_batch=max(splits),
                       bn=bn_mode(arm), cache=False,
                       before_step=lambda ab: grads.append(flat_grad(ab.model))).step(x, y)
    return grads[0]


def digits(seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return (x[:1296], y[:1296]), (x[1296:], y[1296:])


@torch.no_grad()
def evaluate(model, x, y):
    model.eval()
    logits = model(x)
    model.train()
    return ce(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train(task, arm, splits_count, seed, data, epochs, lr, checkpoint_every=0):
    (train_x, train_y), (test_x, test_y) = data
    torch.manual_seed(seed)
    model = MODELS[task]()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    micro_batch = TARGET // splits_count
    ab = None
    if arm not in ("full batch", "plain accumulation"):
        ab = autobatch.wrap(model, optimizer, TARGET, ce, micro_batch=micro_batch, bn=bn_mode(arm), cache=False)
    order = torch.Generator().manual_seed(seed)
    checkpoints, curve = [], []
    with backward_of(arm):
        for _ in range(epochs):
            for step, idx in enumerate(torch.randperm(len(train_x), generator=order).split(TARGET)):
                x, y = train_x[idx], train_y[idx]
                if checkpoint_every and step % checkpoint_every == 0 and len(x) == TARGET:
                    checkpoints.append((copy.deepcopy(model), x, y))
                if ab is not None:
                    ab.step(x, y)
                    continue
                if arm == "full batch":
                    ce(model(x), y).backward()
                else:
                    plain_accumulation_backward(model, x, y, ce, balanced_splits(len(x), micro_batch))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            curve.append(evaluate(model, train_x, train_y)[0])
    loss, _ = evaluate(model, train_x, train_y)
    _, accuracy = evaluate(model, test_x, test_y)
    return {"loss": loss, "accuracy": accuracy, "curve": curve, "checkpoints": checkpoints}


def run(task, seeds, epochs, lr, split_counts):
    data = digits()
    rows, curves = {}, {}
    for seed in range(seeds):
        reference = train(task, "full batch", 1, seed, data, epochs, lr, checkpoint_every=20)
        rows.setdefault("full batch|1", {"loss": [], "accuracy": [], "cosine": []})
        for key in ("loss", "accuracy"):
            rows["full batch|1"][key].append(reference[key])
        rows["full batch|1"]["cosine"].append(1.0)
        curves.setdefault("full batch|1", []).append(reference["curve"])
        truth = [full_batch_grad(m, x, y, ce) for m, x, y in reference["checkpoints"]]
        for k in split_counts:
            for arm in ARMS:
                result = train(task, arm, k, seed, data, epochs, lr)
                cosines = [cosine(arm_grad(arm, m, x, y, balanced_splits(len(x), TARGET // k)), true)
                           for (m, x, y), true in zip(reference["checkpoints"], truth)]
                row = rows.setdefault(f"{arm}|{k}", {"loss": [], "accuracy": [], "cosine": []})
                row["loss"].append(result["loss"])
                row["accuracy"].append(result["accuracy"])
                row["cosine"].append(statistics.mean(cosines))
                curves.setdefault(f"{arm}|{k}", []).append(result["curve"])
                print(f"{task} seed {seed} splits {k} {arm}: loss {result['loss']:.4f} "
                      f"accuracy {result['accuracy']:.3f} cosine {row['cosine'][-1]:.3f}", flush=True)
    return rows, curves


def mean_sd(values, digits=3):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def write(results, args, seconds):
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split_counts = [int(k) for k in args.splits.split(",")]
    lines = ["# Training fidelity on real data (scikit-learn digits)", "",
             f"`python bench/fidelity_real.py` (CPU, float32, {args.seeds} seeds, {args.epochs} epochs of 1,296 "
             f"training images, 501 test images, logical batch {TARGET}, SGD lr {args.lr} momentum 0.9; "
             f"{seconds / 60:.0f} min). Mean ± standard deviation over seeds. Loss: training cross-entropy in "
             "eval mode (running statistics) over the training set after the last epoch; accuracy: test "
             "accuracy; cosine: mean gradient cosine to the true full-batch gradient along the full-batch "
             "trajectory. Arms are described in the script's docstring; `two_pass` is what autobatch ships.", ""]
    for task, (rows, _) in results.items():
        full = rows["full batch|1"]
        lines += [f"## {task}", "", f"Full batch (the reference): loss {mean_sd(full['loss'], 4)}, "
                  f"accuracy {mean_sd(full['accuracy'])}.", "",
                  "| splits | arm | eval-mode training loss | test accuracy | gradient cosine |",
                  "| --- | --- | --- | --- | --- |"]
        for k in split_counts:
            for arm in ARMS:
                row = rows[f"{arm}|{k}"]
                lines.append(f"| {k} (micro-batch {TARGET // k}) | {arm} | {mean_sd(row['loss'], 4)} | "
                             f"{mean_sd(row['accuracy'])} | {mean_sd(row['cosine'])} |")
        lines.append("")
    (out / "fidelity_real.md").write_text("\n".join(lines))
    (out / "fidelity_real.json").write_text(json.dumps(
        {task: {"rows": rows, "curves": curves} for task, (rows, curves) in results.items()}, indent=1))
    plot(results, split_counts, out / "fidelity_real.png")
    print("\n".join(lines))


def plot(results, split_counts, path):
    from autobatch.plot import pyplot

    plt = pyplot()
    styles = {"full batch": ("black", "-"), "plain accumulation": ("tab:orange", "--"),
              "autobatch micro": ("tab:green", "-."), "two_pass, uncentred": ("tab:red", ":"),
              "two_pass, centred (b)": ("tab:purple", "--"), "two_pass": ("tab:blue", "-")}
    fig, axes = plt.subplots(len(results), len(split_counts), figsize=(8, 2.9 * len(results) + 0.8),
                             squeeze=False, sharex=True)
    for row, (task, (_, curves)) in enumerate(results.items()):
        for column, k in enumerate(split_counts):
            for arm, (colour, style) in styles.items():
                runs = curves[f"{arm}|{1 if arm == 'full batch' else k}"]
                values = torch.tensor(runs).mean(0)
                axes[row, column].plot(range(1, len(values) + 1), values, color=colour, linestyle=style,
                                       linewidth=1.8, label=arm)
            axes[row, column].set_yscale("log")
            axes[row, column].set_title(f"{task}, micro-batch {TARGET // k}")
        axes[row, 0].set_ylabel("training loss")
    for column in range(len(split_counts)):
        axes[-1, column].set_xlabel("epoch")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.75 / (2.9 * len(results) + 0.8), 1, 1))
    fig.savefig(path, dpi=110)


def replot(out: pathlib.Path) -> None:
    """Draw the picture again from the json a run wrote."""
    saved = json.loads((out / "fidelity_real.json").read_text())
    results = {task: (entry["rows"], entry["curves"]) for task, entry in saved.items()}
    split_counts = sorted({int(key.split("|")[1]) for key in next(iter(saved.values()))["curves"]} - {1})
    plot(results, split_counts, out / "fidelity_real.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(MODELS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--splits", default="2,4,8")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--replot", action="store_true", help="only draw the picture again from the json")
    args = parser.parse_args()
    if args.replot:
        return replot(pathlib.Path(args.out))
    logging.getLogger("autobatch").setLevel(logging.ERROR)
    started = time.perf_counter()
    results = {task: run(task, args.seeds, args.epochs, args.lr, [int(k) for k in args.splits.split(",")])
               for task in args.tasks.split(",")}
    write(results, args, time.perf_counter() - started)


if __name__ == "__main__":
    main()
