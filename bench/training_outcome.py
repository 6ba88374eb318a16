"""Training outcome of the default against the whole batch, with the noise of the trajectory itself as control.

    pip install -e ".[bench]"              # scikit-learn, which ships the digits
    python bench/training_outcome.py      # ~15 min on 2 CPU cores; writes bench/results/training_outcome.md

scikit-learn's digits (nothing downloaded) and the residual CNN of bench/fidelity_real.py (7 BatchNorm2d),
float64 (``--dtype float32`` as most train), logical batches of 16, SGD (lr 0.05, momentum 0.9), 6 epochs,
3 seeds. Per seed every arm starts
from the same weights and sees the same batches in the same order:

- ``whole batch``: the reference, one forward and backward of 16;
- ``whole batch, weights + 1e-6``: the same, from weights perturbed by N(0, 1e-6): the control, how far two
  runs whose first step differs by rounding-sized amounts drift apart on this task;
- ``autobatch default``: ``wrap(...)`` with no ``bn`` at micro-batches of 4 (two_pass with its precise
  backward: the full batch's gradient);
- ``autobatch two_pass``: the projected backward at micro-batches of 4 (the default up to 0.2);
- ``plain accumulation``: each micro-batch of 4 its own statistics.

Reported: test accuracy and eval-mode training loss after the last epoch (mean ± sd over seeds), and each
arm's distance from the whole-batch run, ``|w - w_whole| / |w_whole - w_0|`` over all parameters, after the
first epoch and after the last. An arm whose distance stays at the control's is indistinguishable from the
whole batch on this task; one far above it trains a different trajectory.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import autobatch  # noqa: E402
from autobatch.reference import plain_accumulation_backward  # noqa: E402
from autobatch.split import balanced_splits  # noqa: E402
from fidelity_real import ResNet, ce, digits, evaluate  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "training_outcome.md"
TARGET, MICRO_BATCH = 16, 4
ARMS = ("whole batch", "whole batch, weights + 1e-6", "autobatch default", "autobatch two_pass",
        "plain accumulation")


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train(arm: str, seed: int, data, epochs: int, lr: float) -> dict:
    (train_x, train_y), (test_x, test_y) = data
    torch.manual_seed(seed)
    model = ResNet().to(train_x.dtype)
    if arm == "whole batch, weights + 1e-6":
        generator = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 1e-6)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    ab = None
    if arm.startswith("autobatch"):
        bn = {"autobatch default": "auto", "autobatch two_pass": "two_pass"}[arm]
        ab = autobatch.wrap(model, optimizer, TARGET, ce, micro_batch=MICRO_BATCH, bn=bn, cache=False)
    order = torch.Generator().manual_seed(seed)
    weights = [flat(model)]
    for _ in range(epochs):
        for idx in torch.randperm(len(train_x), generator=order).split(TARGET):
            x, y = train_x[idx], train_y[idx]
            if ab is not None:
                ab.step(x, y)
                continue
            if arm == "plain accumulation":
                plain_accumulation_backward(model, x, y, ce, balanced_splits(len(x), MICRO_BATCH))
            else:
                ce(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        weights.append(flat(model))
    loss, _ = evaluate(model, train_x, train_y)
    _, accuracy = evaluate(model, test_x, test_y)
    gradient = ab.plan.gradient if ab is not None else ""
    return {"loss": loss, "accuracy": accuracy, "weights": weights, "gradient": gradient}


def mean_sd(values: list[float], digits: int = 3) -> str:
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def span(values: list[float]) -> str:
    return f"{min(values):.1e} to {max(values):.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    args = parser.parse_args()
    logging.getLogger("autobatch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    started = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    data = tuple((x.to(dtype), y) for x, y in digits())
    rows: dict[str, dict[str, list[float]]] = {arm: {"accuracy": [], "loss": [], "first": [], "last": []}
                                               for arm in ARMS}
    said = ""
    for seed in range(args.seeds):
        reference = train("whole batch", seed, data, args.epochs, args.lr)
        start, whole = reference["weights"][0], reference["weights"]
        for arm in ARMS:
            result = reference if arm == "whole batch" else train(arm, seed, data, args.epochs, args.lr)
            row = rows[arm]
            row["accuracy"].append(result["accuracy"])
            row["loss"].append(result["loss"])
            for key, epoch in (("first", 1), ("last", args.epochs)):
                moved = (whole[epoch] - start).norm().item()
                row[key].append((result["weights"][epoch] - whole[epoch]).norm().item() / moved)
            said = result["gradient"] if arm == "autobatch default" else said
            print(f"seed {seed} {arm}: accuracy {result['accuracy']:.3f} loss {result['loss']:.4f} distance "
                  f"{row['first'][-1]:.1e} / {row['last'][-1]:.1e}", flush=True)
    minutes = (time.perf_counter() - started) / 60
    lines = [
        "# Training outcome: the default against the whole batch", "",
        f"`python bench/training_outcome.py{'' if args.dtype == 'float64' else ' --dtype float32'}` (CPU, 2 cores, "
        f"torch {torch.__version__.split('+')[0]}, {args.dtype}, "
        f"{args.seeds} seeds, {args.epochs} epochs of 1,296 training digits, 501 test digits, logical batch 16, "
        f"micro-batches of {MICRO_BATCH}, SGD lr {args.lr} momentum 0.9; {minutes:.0f} min). The residual CNN of "
        "bench/fidelity_real.py (7 BatchNorm2d). Per seed every arm starts from the same weights and sees the same "
        "batches; the control starts from them perturbed by N(0, 1e-6). Distance: |w - w_whole| / |w_whole - w_0| "
        f"over all parameters, after the first and the last epoch (range over seeds). The default's plan said: "
        f"\"{said}\".", "",
        "| arm | test accuracy | eval-mode training loss | distance after epoch 1 | distance after the last epoch |",
        "| --- | --- | --- | --- | --- |"]
    for arm in ARMS:
        row = rows[arm]
        first, last = ("0", "0") if arm == "whole batch" else (span(row["first"]), span(row["last"]))
        lines.append(f"| {arm} | {mean_sd(row['accuracy'])} | {mean_sd(row['loss'], 4)} | {first} | {last} |")
    lines.append("")
    RESULTS.with_name(RESULTS.stem + ("" if args.dtype == "float64" else "_float32") + ".md").write_text(
        "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
