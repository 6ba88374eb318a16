"""torchvision detection through autobatch against the unsplit step: what per-batch padding and
torchvision's batch-wide loss means do to equality, float64.

torchvision's GeneralizedRCNNTransform pads every batch to its largest image, so a micro-batch of
small images is padded less than the whole batch; and its losses are means over the anchors and
proposals sampled in the whole batch, which weigh images equally only when every image fills the
sampler's quota (256 anchors, 512 proposals). The sampler draws with torch.randperm, so a split
step draws other anchors than the unsplit one; to compare the arithmetic it is made deterministic
here (the first anchors of each kind), never in autobatch.

    python bench/detection.py      # needs torchvision (a venv with torch==2.14.1 torchvision==0.29.1)
"""
from __future__ import annotations

import copy
import pathlib
import sys

import torch
from torchvision.models.detection import _utils as detection_utils
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
