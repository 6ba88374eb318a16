"""Training outcome on a stock segmentation architecture: torchvision's LR-ASPP (MobileNetV3-Large),
trained on the demo's generated shapes with the full batch and with each bn mode in micro-batches.

    /tmp/tv/bin/python bench/fidelity_segmentation.py     # ~25 min on 2 CPU cores; writes bench/results/fidelity_segmentation.{md,png}

(The venv of bench/fidelity_models.py.) From the same random weights and the same batch order per
seed, a logical batch of 16 images of 64x64 trains as one batch (the reference) and in micro-batches
of 4 under two_pass, two_pass precise and micro (plain accumulation with running statistics committed
once); Adam, lr 3e-3, 10 epochs. Reported per arm: the validation foreground IoU after each epoch and
the last epoch's training loss, mean and standard deviation over seeds.

Evaluation recalibrates BatchNorm's running statistics first (momentum=None over the 256 training
images in batches of 16, as PreciseBN does for pycls' and detectron2's reported figures): MobileNetV3's
BatchNorm momentum of 0.01 leaves them far from the weights' after a few hundred steps, and eval mode
then predicted no foreground at all for every arm. DeepLabV3-MobileNetV3 at 64x64 (output stride 16: 4x4
features) reached only IoU 0.23 after 10 full-batch epochs, too slow to learn for this CPU budget.
"""
from __future__ import annotations

import argparse
import copy
import logging
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autobatch  # noqa: E402
from autobatch.demo import shapes  # noqa: E402
from autobatch.demo.train import foreground_iou  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
TARGET, MICRO = 16, 4
ARMS = {"full batch": None,
        "two_pass": autobatch.TwoPass(phase1_memory_format=torch.preserve_format),
        "two_pass precise": autobatch.TwoPass(precise=True, phase1_memory_format=torch.preserve_format),
        "micro": autobatch.Micro()}


def model(seed):
    torch.manual_seed(seed)
    return torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                       num_classes=2)


def loss(net, batch):
    return F.cross_entropy(net(batch[0])["out"], batch[1])


def evaluate(net, images, masks, train_images):
    """Validation foreground IoU in eval mode, the running statistics recalibrated on the training images."""
    net = copy.deepcopy(net)
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        for start in range(0, len(train_images), TARGET):
            net(train_images[start:start + TARGET])
        net.eval()
        logits = torch.cat([net(images[i:i + 64])["out"] for i in range(0, len(images), 64)])
    return foreground_iou(logits, masks)


def train(arm, seed, data, epochs):
    (train_x, train_y), (val_x, val_y) = data
    net = model(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    ab = None if ARMS[arm] is None else autobatch.wrap(net, optimizer, TARGET, compute_loss=loss,
                                                       micro_batch=MICRO, bn=ARMS[arm], cache=False)
    order = torch.Generator().manual_seed(seed)
    ious, losses = [], []
    for _ in range(epochs):
        permutation = torch.randperm(len(train_x), generator=order)
        epoch_losses = []
        for start in range(0, len(train_x), TARGET):
            rows = permutation[start:start + TARGET]
            batch = (train_x[rows], train_y[rows])
            if ab is None:
                optimizer.zero_grad()
                value = loss(net, batch)
                value.backward()
                optimizer.step()
                epoch_losses.append(value.item())
            else:
                epoch_losses.append(ab.step(batch))
        ious.append(evaluate(net, val_x, val_y, train_x))
        losses.append(statistics.mean(epoch_losses))
    return ious, losses


def mean_sd(values):
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=256)
    args = parser.parse_args()
    logging.getLogger("autobatch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    started = time.perf_counter()
    data = (shapes(args.train_size, size=64, seed=0), shapes(128, size=64, seed=1))
    curves = {arm: [] for arm in ARMS}
    finals = {arm: [] for arm in ARMS}
    for seed in range(args.seeds):
        for arm in ARMS:
            ious, losses = train(arm, seed, data, args.epochs)
            curves[arm].append(ious)
            finals[arm].append(losses[-1])
            print(f"seed {seed} {arm}: IoU {ious[-1]:.3f}, training loss {losses[-1]:.4f}", flush=True)
    minutes = (time.perf_counter() - started) / 60
    lines = ["# Training outcome: torchvision LR-ASPP (MobileNetV3-Large) on the demo's shapes", "",
             f"`python bench/fidelity_segmentation.py` (CPU, 2 cores, float32, torch {torch.__version__.split('+')[0]}, "
             f"torchvision {torchvision.__version__.split('+')[0]}; {minutes:.0f} min). Random weights, "
             f"{args.train_size} training and 128 validation images of 64x64, logical batch {TARGET}, micro-batches "
             f"of {MICRO}, Adam lr 3e-3, {args.epochs} epochs, {args.seeds} seeds (mean ± standard deviation); "
             "evaluation with BatchNorm's running statistics recalibrated on the training images (see the script).",
             "",
             "| arm | validation IoU, final | validation IoU, best epoch | training loss, last epoch |",
             "| --- | --- | --- | --- |"]
    for arm in ARMS:
        lines.append(f"| {arm} | {mean_sd([c[-1] for c in curves[arm]])} | {mean_sd([max(c) for c in curves[arm]])} "
                     f"| {mean_sd(finals[arm])} |")
    lines += ["", "![validation IoU per epoch](fidelity_segmentation.png)", ""]
    if args.seeds == 3 and args.epochs == 10 and args.train_size == 256:
        (RESULTS / "fidelity_segmentation.md").write_text("\n".join(lines))
        plot(curves, RESULTS / "fidelity_segmentation.png")
    print("\n".join(lines))


def plot(curves, path):
    from autobatch.plot import pyplot

    plt = pyplot()  # LEGIBLE's font sizes

    styles = {"full batch": ("black", "-"), "two_pass": ("tab:blue", "--"), "two_pass precise": ("tab:purple", ":"),
              "micro": ("tab:green", "-.")}
    fig, axis = plt.subplots(figsize=(6.4, 4.2))
    for arm, runs in curves.items():
        values = torch.tensor(runs)
        epochs = range(1, values.shape[1] + 1)
        mean, spread = values.mean(0), values.std(0) if len(runs) > 1 else torch.zeros(values.shape[1])
        colour, style = styles[arm]
        axis.plot(epochs, mean, color=colour, linestyle=style, linewidth=2, label=arm)
        axis.fill_between(epochs, mean - spread, mean + spread, color=colour, alpha=0.12)
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation foreground IoU")
    axis.set_title(f"LR-ASPP MobileNetV3, batch {TARGET}, micro-batches of {MICRO}")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
