"""A segmentation dataset built on the spot: shapes on textured backgrounds, with their masks.

    >>> images, masks = shapes(256, size=48, seed=0)   # (256, 3, 48, 48) float, (256, 48, 48) long
"""
from __future__ import annotations

import math

import torch

__all__ = ["detection_shapes", "shapes"]


def _texture(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Stripes at random angles and frequencies, in random colours, with noise."""
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = torch.rand(count, 1, 1, generator=generator) * math.pi
    frequency = 3 + torch.rand(count, 1, 1, generator=generator) * 9
    phase = torch.rand(count, 1, 1, generator=generator) * 2 * math.pi
    wave = torch.sin(frequency * (xx * torch.cos(angle) + yy * torch.sin(angle)) * math.pi + phase)
    colour = torch.rand(count, 3, 1, 1, generator=generator) * 2 - 1
    noise = torch.randn(count, 3, size, size, generator=generator) * 0.3
    return 0.5 * wave.unsqueeze(1) * colour + noise


def _masks(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """One to three discs, squares or triangles per image."""
    coords = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    for index in range(count):
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            cx, cy = (0.15 + 0.7 * torch.rand(2, generator=generator)).tolist()
            radius = float(0.08 + 0.12 * torch.rand(1, generator=generator))
            kind = int(torch.randint(0, 3, (1,), generator=generator))
            dx, dy = xx - cx, yy - cy
            if kind == 0:
                shape = dx ** 2 + dy ** 2 <= radius ** 2
            elif kind == 1:
                shape = (dx.abs() <= radius) & (dy.abs() <= radius)
            else:
                shape = (dy <= radius) & (dy >= 2 * dx.abs() - radius)
            masks[index] |= shape
    return masks


def shapes(count: int, size: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images (N, 3, size, size) and their foreground masks (N, size, size), deterministic in ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    images = _texture(count, size, generator)
    masks = _masks(count, size, generator)
    # Each shape gets its own colour and a texture of its own, so that only its outline tells it apart.
    colour = torch.rand(count, 3, 1, 1, generator=generator) * 2 - 1
    inside = colour + 0.5 * _texture(count, size, generator)
    images = torch.where(masks.unsqueeze(1), inside, images)
    return images.float(), masks.long()


def detection_shapes(sizes: list[tuple[int, int]], seed: int = 0, masks: bool = False,
                     dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection samples in torchvision's convention: one image (3, H, W) per entry of ``sizes`` and its
    target, a dict of ``boxes`` (K, 4) in pixels, ``labels`` (K,) of classes 1 (square) and 2 (disc),
    and with ``masks`` the (K, H, W) instance masks. One to three shapes per image, on a textured
    background; deterministic in ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for height, width in sizes:
        image = _texture(1, max(height, width), generator)[0, :, :height, :width].to(dtype)
        yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        boxes, labels, instance_masks = [], [], []
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            side = int(min(height, width) * (0.2 + 0.25 * float(torch.rand(1, generator=generator))))
            x0 = int(torch.randint(0, width - side, (1,), generator=generator))
            y0 = int(torch.randint(0, height - side, (1,), generator=generator))
            label = int(torch.randint(1, 3, (1,), generator=generator))
            inside = (xx >= x0) & (xx < x0 + side) & (yy >= y0) & (yy < y0 + side)
            if label == 2:
                inside &= (xx - x0 - side / 2 + 0.5) ** 2 + (yy - y0 - side / 2 + 0.5) ** 2 <= (side / 2) ** 2
            image = torch.where(inside, torch.rand(3, 1, 1, generator=generator, dtype=dtype) * 2 - 1, image)
            boxes.append([x0, y0, x0 + side, y0 + side])
            labels.append(label)
            instance_masks.append(inside)
        target = {"boxes": torch.tensor(boxes, dtype=dtype), "labels": torch.tensor(labels)}
        if masks:
            target["masks"] = torch.stack(instance_masks).to(torch.uint8)
        images.append(image)
        targets.append(target)
    return images, targets
