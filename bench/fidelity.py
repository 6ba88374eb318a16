"""Does training with autobatch behave like training with the real batch? The demo's task, 6 arms.

    python bench/fidelity.py      # ~11 min on 2 CPU cores; writes bench/results/fidelity.{md,json,png}
    python bench/fidelity.py --device cuda --width 224   # a ResNet-50-sized U-Net (22.8 M parameters)
    python bench/fidelity.py --arms "autobatch exact" --splits 2    # one arm (files named after it)

From the same initial weights and the same batch order (per seed), train the demo U-Net with a
logical batch of 16 as: the real full batch (the reference), plain accumulation, the forum's
frozen-statistics scheme, autobatch two_pass, micro and exact (the whole batch, its top-level blocks
checkpointed; the split count does not apply to it), at 2, 4 and 8 splits. Reported
per arm: final training loss and validation IoU (eval mode), the relative distance of the final
weights from the reference's, and the cosine of each arm's gradient to the full-batch gradient,
measured at checkpoints along the reference trajectory.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import pathlib
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autobatch  # noqa: E402
from autobatch.checkpointing import candidates  # noqa: E402
from autobatch.demo import UNet, shapes  # noqa: E402
from autobatch.demo.train import evaluate  # noqa: E402
from autobatch.reference import (  # noqa: E402
    cosine,
    flat_grad,
    frozen_statistics_backward,
    frozen_statistics_grad,
    full_batch_grad,
    plain_accumulation_backward,
    plain_accumulation_grad,
)
from autobatch.split import balanced_splits  # noqa: E402

ARMS = ("plain accumulation", "frozen statistics (forum)", "autobatch two_pass", "autobatch micro", "autobatch exact")
TARGET = 16
ce = nn.CrossEntropyLoss()


def wrapped(model, optimizer, micro_batch, bn, x, y, **options):
    """autobatch with ``bn``; bn="exact" runs the whole batch with the model's top-level blocks
    checkpointed (what the planner picks for the U-Net where the whole batch does not fit as it is)."""
    if bn != "exact":
        return autobatch.wrap(model, optimizer, TARGET, ce, micro_batch=micro_batch, bn=bn, cache=False, **options)
    ab = autobatch.wrap(model, optimizer, TARGET, ce, bn=bn, cache=False, memory_budget=10**12, **options)
    ab.tune(x, y)
    ab.plan = ab.plan.replace(checkpointing=candidates(model)[1])
    return ab


def autobatch_grad(model, x, y, micro_batch, bn):
    model = copy.deepcopy(model)
    grads = []
    wrapped(model, torch.optim.SGD(model.parameters(), lr=0.0), micro_batch, bn, x, y,
            before_step=lambda ab: grads.append(flat_grad(ab.model))).step(x, y)
    return grads[0]


def arm_grad(arm, model, x, y, splits):
    if arm == "plain accumulation":
        return plain_accumulation_grad(model, x, y, ce, splits)
    if arm == "frozen statistics (forum)":
        return frozen_statistics_grad(model, x, y, ce, splits)
    return autobatch_grad(model, x, y, max(splits), arm.split()[-1])


def train(arm, splits_count, seed, data, epochs, checkpoint_every, width=16, device=torch.device("cpu")):
    """Train one arm; returns its curves, final metrics and weights (and, for the reference, checkpoints)."""
    (train_x, train_y), (val_x, val_y) = data
    torch.manual_seed(seed)
    model = UNet(width=width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    micro_batch = TARGET // splits_count
    ab = None
    if arm.startswith("autobatch"):
        ab = wrapped(model, optimizer, micro_batch, arm.split()[-1], train_x[:TARGET], train_y[:TARGET])
    order = torch.Generator().manual_seed(seed)
    curves = {"train_loss": [], "val_iou": []}
    checkpoints = []
    probe_x, probe_y = train_x[:128], train_y[:128]
    for epoch in range(epochs):
        for step, idx in enumerate(torch.randperm(len(train_x), generator=order).split(TARGET)):
            x, y = train_x[idx], train_y[idx]
            if arm == "full batch" and step % checkpoint_every == 0:
                checkpoints.append((copy.deepcopy(model), x, y))
            if ab is not None:
                ab.step(x, y)
                continue
            splits = balanced_splits(len(x), micro_batch)
            if arm == "full batch":
                ce(model(x), y).backward()
            elif arm == "plain accumulation":
                plain_accumulation_backward(model, x, y, ce, splits)
            else:
                frozen_statistics_backward(model, x, y, ce, splits)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            curves["train_loss"].append(ce(model(probe_x), probe_y).item())
        model.train()
        curves["val_iou"].append(evaluate(model, val_x, val_y, device)[0])
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"curves": curves, "weights": weights, "checkpoints": checkpoints}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--splits", default="2,4,8")
    parser.add_argument("--width", type=int, default=16, help="U-Net width (the demo's: 16)")
    parser.add_argument("--size", type=int, default=48, help="image size (the demo's: 48)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms (the full batch always runs)")
    parser.add_argument("--replot", metavar="JSON", help="only draw a run's picture again from the json it wrote")
    args = parser.parse_args()
    if args.replot:
        return replot(pathlib.Path(args.replot))
    args.arms = [arm for arm in ARMS if arm in args.arms.split(",")]
    logging.getLogger("autobatch").setLevel(logging.ERROR)
    started = time.perf_counter()
    device = torch.device(args.device)
    # Training data on the device; validation images stay on the host (evaluate moves them in chunks).
    train_x, train_y = shapes(args.train_size, args.size, 0)
    data = ((train_x.to(device), train_y.to(device)), shapes(128, args.size, 1))
    options = {"width": args.width, "device": device}
    split_counts = [int(k) for k in args.splits.split(",")]
    rows: dict = {}
    curves: dict = {}
    for seed in range(args.seeds):
        reference = train("full batch", 1, seed, data, args.epochs, checkpoint_every=16, **options)
        curves.setdefault(("full batch", 1), []).append(reference["curves"])
        for k in split_counts:
            for arm in args.arms:
                result = train(arm, k, seed, data, args.epochs, checkpoint_every=0, **options)
                distance = ((result["weights"] - reference["weights"]).norm() / reference["weights"].norm()).item()
                cosines = [cosine(arm_grad(arm, m, x, y, balanced_splits(len(x), TARGET // k)),
                                  full_batch_grad(m, x, y, ce)) for m, x, y in reference["checkpoints"]]
                row = rows.setdefault((arm, k), {"loss": [], "iou": [], "distance": [], "cosine": []})
                row["loss"].append(result["curves"]["train_loss"][-1])
                row["iou"].append(result["curves"]["val_iou"][-1])
                row["distance"].append(distance)
                row["cosine"].append(statistics.mean(cosines))
                curves.setdefault((arm, k), []).append(result["curves"])
                print(f"seed {seed} splits {k} {arm}: loss {row['loss'][-1]:.4f} IoU {row['iou'][-1]:.3f} "
                      f"distance {distance:.3f} cosine {row['cosine'][-1]:.3f}", flush=True)
        ref_row = rows.setdefault(("full batch", 1), {"loss": [], "iou": [], "distance": [], "cosine": []})
        ref_row["loss"].append(reference["curves"]["train_loss"][-1])
        ref_row["iou"].append(reference["curves"]["val_iou"][-1])
        ref_row["distance"].append(0.0)
        ref_row["cosine"].append(1.0)
    write(rows, curves, split_counts, args, time.perf_counter() - started, device)


def mean_sd(values):
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def write(rows, curves, split_counts, args, seconds, device):
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo = args.width == 16 and args.size == 48 and device.type == "cpu"
    # The demo's settings keep the file names the documentation shows; others get their own.
    stem = "fidelity" if demo else f"fidelity-{device.type}-width{args.width}-size{args.size}"
    options = "" if demo else f" --device {args.device} --width {args.width} --size {args.size}"
    if args.arms != list(ARMS):
        stem += "-" + "-".join(arm.split()[-1] for arm in args.arms)
        options += f' --arms "{",".join(args.arms)}" --splits {args.splits}'
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    parameters = sum(p.numel() for p in UNet(width=args.width).parameters()) / 1e6
    lines = ["# Training fidelity on the demo task", "",
             f"`python bench/fidelity.py{options}` ({where}, float32, U-Net width {args.width} ({parameters:.1f} M "
             f"parameters), {args.size}x{args.size} images, {args.seeds} seeds, {args.epochs} epochs of "
             f"{args.train_size} images, logical batch {TARGET}, Adam lr 3e-3; {seconds / 60:.0f} min). "
             "Mean ± standard deviation over seeds. Loss: training cross-entropy in eval mode (running "
             "statistics) on 128 training images; IoU: validation foreground IoU; distance: "
             "|w - w_full| / |w_full| of the final weights; cosine: mean gradient cosine to the full batch "
             "along the full-batch trajectory.", ""]
    reference = rows[("full batch", 1)]
    lines.append(f"Full batch (the reference): loss {mean_sd(reference['loss'])}, IoU {mean_sd(reference['iou'])}.")
    lines.append("")
    for k in split_counts:
        lines += [f"## {k} splits (micro-batches of {TARGET // k})", "",
                  "| arm | final loss | validation IoU | weight distance | gradient cosine |",
                  "| --- | --- | --- | --- | --- |"]
        for arm in args.arms:
            row = rows[(arm, k)]
            lines.append(f"| {arm} | {mean_sd(row['loss'])} | {mean_sd(row['iou'])} | "
                         f"{mean_sd(row['distance'])} | {mean_sd(row['cosine'])} |")
        lines.append("")
    (out / f"{stem}.md").write_text("\n".join(lines))
    (out / f"{stem}.json").write_text(json.dumps(
        {f"{arm}|{k}": {"rows": rows[(arm, k)], "curves": curves[(arm, k)]} for arm, k in rows}, indent=1))
    plot(curves, split_counts, out / f"{stem}.png", args.arms)
    print("\n".join(lines))


def plot(curves, split_counts, path, arms):
    from autobatch.plot import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(len(split_counts), 2, figsize=(8, 2.7 * len(split_counts) + 0.8), sharex=True,
                             squeeze=False)
    styles = {"full batch": ("black", "-"), "plain accumulation": ("tab:orange", "--"),
              "frozen statistics (forum)": ("tab:red", ":"), "autobatch two_pass": ("tab:blue", "-"),
              "autobatch micro": ("tab:green", "-."), "autobatch exact": ("tab:purple", ":")}
    styles = {arm: style for arm, style in styles.items() if arm == "full batch" or arm in arms}
    for row, k in enumerate(split_counts):
        for arm, (colour, style) in styles.items():
            runs = curves[(arm, 1 if arm == "full batch" else k)]
            for column, metric in enumerate(("train_loss", "val_iou")):
                values = torch.tensor([run[metric] for run in runs]).mean(0)
                epochs = range(1, len(values) + 1)
                axes[row, column].plot(epochs, values, color=colour, linestyle=style, linewidth=1.8, label=arm)
        axes[row, 0].set_title(f"training loss, micro-batch {TARGET // k}")
        axes[row, 1].set_title(f"validation IoU, micro-batch {TARGET // k}")
        axes[row, 0].set_yscale("log")
    for column in range(2):
        axes[-1, column].set_xlabel("epoch")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.75 / (2.7 * len(split_counts) + 0.8), 1, 1))
    fig.savefig(path, dpi=110)


def replot(saved: pathlib.Path) -> None:
    """Draw the picture of a run again from the json it wrote (next to it, under the same name)."""
    entries = json.loads(saved.read_text())
    curves = {(key.split("|")[0], int(key.split("|")[1])): entry["curves"] for key, entry in entries.items()}
    split_counts = sorted({k for _, k in curves} - {1})
    plot(curves, split_counts, saved.with_suffix(".png"), [arm for arm, _ in curves])


if __name__ == "__main__":
    main()
