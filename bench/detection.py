"""torchvision detection through autobatch against the unsplit step: what per-batch padding and
torchvision's batch-wide loss means do to equality, float64.

torchvision's GeneralizedRCNNTransform pads every batch to its largest image, so a micro-batch of
small images is padded less than the whole batch; and its losses are means over the anchors and
proposals sampled in the whole batch, which weigh images equally only when every image fills the
sampler's quota (256 anchors, 512 proposals). The sampler draws with torch.randperm, so a split
step draws other anchors than the unsplit one; to compare the arithmetic it is made deterministic
here (the first anchors of each kind), never in autobatch.

    python bench/detection.py      # needs torchvision (a venv with torch==2.14.1 torchvision==0.29.1)
    python bench/detection.py --detectors     # each torchvision detector, frozen BatchNorm: results/detection_models.md

The second table runs Faster R-CNN, RetinaNet, FCOS, Mask R-CNN and Keypoint R-CNN (weights=None, their
BatchNorm layers in eval mode, as pretrained backbones freeze them) with the plain sum of their losses,
and FCOS with the count-weighted pair of :func:`fcos_loss`, whose count is the foreground locations its
head divides by.
"""
from __future__ import annotations

import copy
import pathlib
import sys
import time

import torch
from torchvision.models.detection import _utils as detection_utils
from torchvision.models import detection
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autobatch  # noqa: E402
from autobatch.demo.data import detection_shapes  # noqa: E402
from autobatch.reference import cosine, flat_grad, relative_error  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "detection.md"


def first_of_each_kind(self, matched_idxs):
    """BalancedPositiveNegativeSampler without randomness: the first positives and negatives."""
    positives, negatives = [], []
    for matched in matched_idxs:
        positive, negative = torch.where(matched >= 1)[0], torch.where(matched == 0)[0]
        count = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
        kept_positive, kept_negative = torch.zeros_like(matched, dtype=torch.uint8), torch.zeros_like(
            matched, dtype=torch.uint8)
        kept_positive[positive[:count]] = 1
        kept_negative[negative[:min(negative.numel(), self.batch_size_per_image - count)]] = 1
        positives.append(kept_positive)
        negatives.append(kept_negative)
    return positives, negatives


def detection_loss(model, batch):
    return sum(model(*batch).values())


def fcos_loss(model, batch):
    """FCOS's losses as ``(loss_sum, count)``: its head divides each loss by the foreground locations of the
    whole batch, which this reads from the head's own matching (the recipe in docs/guide/detection.md)."""
    head, counts = getattr(model, "module", model).head, []
    compute_loss = head.compute_loss

    def counted(targets, head_outputs, anchors, matched_idxs):
        counts.append(sum(int((matched >= 0).sum()) for matched in matched_idxs))
        return compute_loss(targets, head_outputs, anchors, matched_idxs)

    head.compute_loss = counted
    try:
        losses = model(*batch)
    finally:
        del head.compute_loss
    count = max(1, counts[0])
    return sum(losses.values()) * count, count


def keypoint_targets(batch):
    """Two keypoints per box (its top-left and bottom-right corners, visible) for Keypoint R-CNN."""
    images, targets = batch
    for target in targets:
        boxes = target["boxes"]
        target["keypoints"] = torch.stack([torch.stack([boxes[:, 0], boxes[:, 1], torch.ones_like(boxes[:, 0])], 1),
                                           torch.stack([boxes[:, 2] - 1, boxes[:, 3] - 1, torch.ones_like(boxes[:, 0])],
                                                       1)], 1)
    return images, targets


DETECTORS = {
    "Faster R-CNN (MobileNetV3-Large FPN)": lambda: detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=224, max_size=1000),
    "RetinaNet (ResNet-50 FPN)": lambda: detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=224, max_size=1000),
    "FCOS (ResNet-50 FPN)": lambda: detection.fcos_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=224, max_size=1000),
    "Mask R-CNN (ResNet-50 FPN)": lambda: detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=224, max_size=1000),
    "Keypoint R-CNN (ResNet-50 FPN)": lambda: detection.keypointrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, num_keypoints=2, min_size=224, max_size=1000),
}


def detector_error(name, sizes, compute_loss):
    """Relative gradient error (cosine) of a two_pass step in micro-batches of 2 against the unsplit
    step, BatchNorm frozen (eval mode)."""
    torch.manual_seed(0)
    # torchvision's keypoint head takes float32 keypoints only: that detector runs in float32.
    dtype = torch.float32 if "Keypoint" in name else torch.float64
    model = DETECTORS[name]().to(dtype).train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    batch = detection_shapes(sizes, seed=1, dtype=dtype, masks="Mask" in name)
    if "Keypoint" in name:
        batch = keypoint_targets(batch)
    reference = copy.deepcopy(model)
    detection_loss(reference, batch).backward()
    expected, grads = flat_grad(reference), []
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0), len(sizes), compute_loss=compute_loss,
                        micro_batch=2, cache=False, before_step=lambda ab: grads.append(flat_grad(ab.model)))
    ab.step(batch)
    return f"{relative_error(grads[0], expected):.2g} (cosine {cosine(grads[0], expected):.4f})"


def detectors(only: list[str]) -> None:
    """Each detector's table row (``only``: the detectors whose names hold one of these words; all if empty)."""
    started = time.perf_counter()
    same, mixed = [(224, 224)] * 4, [(224, 224)] * 2 + [(224, 320)] * 2
    rows = ["| detector | loss | 4 images of 224x224 | 2 of 224x224, 2 of 224x320 |", "| --- | --- | --- | --- |"]
    for name in [n for n in DETECTORS if not only or any(word in n for word in only)]:
        recipes = [("sum of the losses", detection_loss)] + ([("`fcos_loss` pair", fcos_loss)] if "FCOS" in name else [])
        for label, compute_loss in recipes:
            rows.append(f"| {name} | {label} | {detector_error(name, same, compute_loss)} | "
                        f"{detector_error(name, mixed, compute_loss)} |")
            print(rows[-1], flush=True)
    minutes = (time.perf_counter() - started) / 60
    if only:
        return
    RESULTS.with_name("detection_models.md").write_text(
        "# torchvision's detectors: a step in micro-batches of 2 against the unsplit step\n\n"
        f"`python bench/detection.py --detectors` (torch 2.14.1, torchvision 0.29.1, CPU, float64 but Keypoint R-CNN, "
        f"whose keypoint head takes float32 only; {minutes:.0f} min): "
        "weights=None, BatchNorm in eval mode (frozen, as pretrained backbones have it), min_size 224, generated "
        "images; the samplers made deterministic (first anchors and proposals of each kind). Relative error of the "
        "accumulated gradient (its cosine).\n\n" + "\n".join(rows) + "\n")


def compare(base, sizes, bn, frozen):
    """Relative gradient error and cosine of a step in micro-batches of 2 against the unsplit step."""
    batch = detection_shapes(sizes, seed=1, dtype=torch.float64)
    reference = copy.deepcopy(base)
    if frozen:
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
    model = copy.deepcopy(reference)
    detection_loss(reference, batch).backward()
    expected, grads = flat_grad(reference), []
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0), len(sizes), compute_loss=detection_loss,
                        micro_batch=2, bn=bn, cache=False, before_step=lambda ab: grads.append(flat_grad(ab.model)))
    try:
        ab.step(batch)
    except RuntimeError as error:
        return f"refused: {str(error)[:90]}..."
    return f"{relative_error(grads[0], expected):.2g} (cosine {cosine(grads[0], expected):.4f})"


def main() -> None:
    detection_utils.BalancedPositiveNegativeSampler.__call__ = first_of_each_kind
    if "--detectors" in sys.argv[1:]:
        detectors([word for word in sys.argv[1:] if word != "--detectors"])
        return
    torch.manual_seed(0)
    base = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=224,
                                             max_size=1000).double().train()
    cases = [
        ("4 images of 224x224 (quotas filled)", [(224, 224)] * 4),
        ("2 of 224x224, then 2 of 224x320 (micro-batches padded less)", [(224, 224)] * 2 + [(224, 320)] * 2),
    ]
    rows = ["| BatchNorm | images | bn | relative gradient error (cosine) |", "|---|---|---|---|"]
    for frozen, bn in ((True, "two_pass"), (False, "two_pass"), (False, "micro")):
        for label, sizes in cases:
            rows.append(f"| {'frozen (eval)' if frozen else 'trained'} | {label} | {bn} | "
                        f"{compare(base, sizes, bn, frozen)} |")
            print(rows[-1], flush=True)
    torch.manual_seed(0)  # its weights independent of what the cases above drew
    small = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=64,
                                              max_size=1000).double().train()
    rows.append(f"| frozen (eval) | 4 images of 64x96 (quotas not filled: 206-210 anchors, 85-89 proposals) | "
                f"two_pass | {compare(small, [(64, 96)] * 4, 'two_pass', True)} |")
    print(rows[-1])
    RESULTS.write_text(
        "# torchvision detection: a step in micro-batches of 2 against the unsplit step\n\n"
        "`python bench/detection.py` (torch 2.14.1, torchvision 0.29.1, CPU, float64): "
        "fasterrcnn_mobilenet_v3_large_fpn, weights=None, 3 classes, min_size 224, 4 generated images; the "
        "samplers made deterministic (first anchors and proposals of each kind) so that both steps draw alike.\n\n"
        + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
