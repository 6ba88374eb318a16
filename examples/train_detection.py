"""Train torchvision's Faster R-CNN (MobileNetV3-FPN) on generated shapes, a logical batch of 4 images
in micro-batches that fit a memory budget. Nothing is downloaded.

    pip install torchvision     # the build made for your torch
    python examples/train_detection.py

torchvision's detection models take a list of images of any sizes and a list of target dicts;
``ab.step((images, targets))`` splits both lists into micro-batches with no option. The backbone's
BatchNorm layers train here (weights=None), and torchvision pads each batch to its largest image:
batches of one image size, as torchvision's references group them by aspect ratio, give every
micro-batch the whole batch's padding, so that two_pass can normalize it with the whole batch's
statistics (docs/guide/detection.md). With pretrained, frozen BatchNorm any sizes may be mixed.
"""
import time

import torch
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

import autobatch
from autobatch.demo.data import detection_shapes

SIZES = [(144, 176), (176, 144), (160, 160)]


def detection_loss(model, batch):
    """torchvision's detection models return their losses in training mode: their sum is the loss."""
    images, targets = batch
    return sum(model(images, targets).values())


def main() -> None:
    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=144,
                                              max_size=176).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, weight_decay=1e-4)
    start = time.perf_counter()
    # The budget stands in for a small GPU: the planner measures real steps and splits the batch of 4.
    with autobatch.wrap(model, optimizer, target_batch=4, compute_loss=detection_loss, memory_budget="340MiB",
                        max_grad_norm=10.0, cache=False) as ab:
        for step in range(8):
            images, targets = detection_shapes([SIZES[step % len(SIZES)]] * 4, seed=step)
            loss = ab.step((images, targets))
            print(f"step {step}: loss {loss:.3f}  ({time.perf_counter() - start:.0f} s)")
        print(ab.plan)


if __name__ == "__main__":
    main()
