"""The demo's training run: the U-Net on the shapes, a logical batch of 16 under a memory budget.

    >>> result = run(epochs=6, memory_budget="24MiB", bn="two_pass")
    >>> result.validation_iou, result.picture
"""
from __future__ import annotations

import pathlib
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import autobatch
from autobatch.demo.data import shapes
from autobatch.demo.lettering import lettering
from autobatch.demo.png import write_png
from autobatch.demo.unet import UNet
from autobatch.plan import Plan

__all__ = ["DemoResult", "foreground_iou", "run"]


@dataclass
class DemoResult:
    plan: Plan
    losses: list[float]
    validation_iou: float
    picture: Optional[pathlib.Path]
    seconds: float


def foreground_iou(logits: torch.Tensor, masks: torch.Tensor) -> float:
    """Intersection over union of the predicted and true foreground, over all pixels given."""
    predicted = logits.argmax(1) == 1
    truth = masks == 1
    union = (predicted | truth).sum().item()
    return (predicted & truth).sum().item() / union if union else 1.0


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, device: torch.device,
             batch: int = 64) -> tuple[float, torch.Tensor]:
    model.eval()
    logits = torch.cat([model(images[i:i + batch].to(device)).cpu() for i in range(0, len(images), batch)])
    model.train()
    return foreground_iou(logits, masks), logits


TITLES = ("INPUT", "TRUE MASK", "PREDICTED")


def picture(images: torch.Tensor, masks: torch.Tensor, logits: torch.Tensor, rows: int = 4,
            zoom: int = 3) -> torch.Tensor:
    """Rows of (input, true mask, predicted mask) under their column titles, each tile enlarged ``zoom`` times."""
    images, masks, logits = (t.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2) for t in (images, masks, logits))
    size = images.shape[-1]
    band = 7 * 2 + 8  # the titles' height at scale 2, and a margin
    canvas = torch.ones(3, band + rows * (size + 2), 3 * (size + 2))
    for column, title in enumerate(TITLES):
        ink = next((ink for scale in (2, 1) if (ink := lettering(title, scale)).shape[1] <= size), None)
        if ink is None:
            continue  # tiles too small for a title
        top, left = (band - ink.shape[0]) // 2, column * (size + 2) + 1 + (size - ink.shape[1]) // 2
        canvas[:, top:top + ink.shape[0], left:left + ink.shape[1]] -= ink
    for row in range(rows):
        image = (images[row] - images[row].min()) / (images[row].max() - images[row].min() + 1e-8)
        tiles = [image, masks[row].float().expand(3, -1, -1), (logits[row].argmax(0) == 1).float().expand(3, -1, -1)]
        for column, tile in enumerate(tiles):
            top, left = band + row * (size + 2) + 1, column * (size + 2) + 1
            canvas[:, top:top + size, left:left + size] = tile
    return canvas


def run(epochs: int = 8, memory_budget: Union[int, float, str, None] = "24MiB", bn: str = "two_pass",
        device: Union[str, torch.device] = "cpu", target_batch: int = 16, train_size: int = 512,
        size: int = 48, seed: int = 0, out_dir: Union[str, pathlib.Path, None] = "demo-out",
        micro_batch: Union[int, str] = "auto", progress: bool = True) -> DemoResult:
    """Train the U-Net with ``autobatch`` and return the plan, losses, validation IoU and picture path."""
    start = time.perf_counter()
    device = torch.device(device)
    torch.manual_seed(seed)
    train_images, train_masks = shapes(train_size, size, seed)
    val_images, val_masks = shapes(128, size, seed + 1)
    model = UNet().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    ab = autobatch.wrap(model, optimizer, target_batch=target_batch, loss_fn=nn.CrossEntropyLoss(),
                        micro_batch=micro_batch, bn=bn,
                        memory_budget=memory_budget if micro_batch == "auto" else None)
    if micro_batch == "auto":
        ab.tune(train_images[:target_batch], train_masks[:target_batch])  # before the progress bars
    order_generator = torch.Generator().manual_seed(seed)
    losses = []
    # Log lines (the first step's memory-format choice, say) go above the bar instead of through it.
    with logging_redirect_tqdm():
        for epoch in range(epochs):
            order = torch.randperm(train_size, generator=order_generator)
            bar = tqdm(order.split(target_batch), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress,
                       leave=True, dynamic_ncols=True)
            epoch_losses = []
            for indices in bar:
                epoch_losses.append(ab.step(train_images[indices], train_masks[indices]))
                bar.set_postfix(loss=f"{sum(epoch_losses[-8:]) / len(epoch_losses[-8:]):.4f}")
            iou, logits = evaluate(model, val_images, val_masks, device)
            bar.set_postfix(loss=f"{sum(epoch_losses) / len(epoch_losses):.4f}", val_iou=f"{iou:.3f}")
            bar.close()
            losses.extend(epoch_losses)
    path = None
    if out_dir is not None:
        path = pathlib.Path(out_dir) / "demo-prediction.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(path, picture(val_images, val_masks, logits))
    return DemoResult(ab.plan, losses, iou, path, time.perf_counter() - start)
