"""torchvision's detection models through ``ab.step((images, targets))``: lists of samples, no option.

Skipped without torchvision: its CPU build for CI's torch is not on the package index (docs/development.md
says how to run these in a venv with torch 2.14.1 and torchvision 0.29.1).
"""
import copy

import pytest
import torch

import autobatch
from autobatch.demo.data import detection_shapes

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import _utils as detection_utils  # noqa: E402
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn, maskrcnn_resnet50_fpn  # noqa: E402

pytestmark = pytest.mark.slow


def detection_loss(model, batch):
    return sum(model(*batch).values())


#: Per model: its transform's sizes, the images' long and short sides, and its optimizer's momentum. Large
#: enough that activations, not the optimizer step, set a step's peak, so that a budget can split the batch.
SETTINGS = {"fasterrcnn_mobilenet_v3_large_fpn": (fasterrcnn_mobilenet_v3_large_fpn, 256, 192, 0.9),
            "maskrcnn_resnet50_fpn": (maskrcnn_resnet50_fpn, 320, 256, 0.0)}


def build(name):
    torch.manual_seed(0)
    constructor, long, short, _ = SETTINGS[name]
    return constructor(weights=None, weights_backbone=None, num_classes=3, min_size=short, max_size=long).train()


def batches(name, steps=2):
    # Every batch of one image size (the BatchNorm layers train: see the refusal below), sizes varying.
    _, long, short, _ = SETTINGS[name]
    return [detection_shapes([(long, short) if step % 2 else (short, long)] * 4, seed=step,
                             masks=name.startswith("mask")) for step in range(steps)]


def optimizer_for(name, model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=SETTINGS[name][3])


def budget_between_two_and_four(name, model):
    """A memory budget between autobatch's measured peaks of 2 and of 4 images: the whole batch does not fit."""
    model = copy.deepcopy(model)
    ab = autobatch.wrap(model, optimizer_for(name, model), 4, compute_loss=detection_loss, memory_budget=10**12)
    points = dict(ab.tune(batches(name, 1)[0]).points)
    return int((points[2] + points[4]) / 2 / 0.9)  # the planner keeps a 10% margin under the budget


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_fpn", "maskrcnn_resnet50_fpn"])
@pytest.mark.parametrize("micro_batch", [2, "auto"])
def test_detection_models_train_in_micro_batches(name, micro_batch):
    model = build(name)
    keys = list(model.state_dict())
    before = copy.deepcopy(model.state_dict())
    options = {"memory_budget": budget_between_two_and_four(name, model)} if micro_batch == "auto" else {}
    ab = autobatch.wrap(model, optimizer_for(name, model), 4, compute_loss=detection_loss, micro_batch=micro_batch,
                        **options)
    losses = [ab.step(batch) for batch in batches(name)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert len(ab.plan.splits) > 1, ab.plan
    assert list(model.state_dict()) == keys
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any("backbone" in k for k in changed) and any("roi_heads" in k for k in changed)


def first_of_each_kind(self, matched_idxs):
    """The samplers without randomness (the first anchors of each kind), so that two steps draw alike."""
    positives, negatives = [], []
    for matched in matched_idxs:
        positive, negative = torch.where(matched >= 1)[0], torch.where(matched == 0)[0]
        count = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
        kept = [torch.zeros_like(matched, dtype=torch.uint8) for _ in range(2)]
        kept[0][positive[:count]] = 1
        kept[1][negative[:min(negative.numel(), self.batch_size_per_image - count)]] = 1
        positives.append(kept[0])
        negatives.append(kept[1])
    return positives, negatives


def test_a_split_detection_step_equals_the_unsplit_one(monkeypatch):
    # Frozen BatchNorm (as with pretrained weights), images of one size, every image filling the samplers'
    # quotas: torchvision's batch-wide means weigh images equally, so the split step is the unsplit one.
    monkeypatch.setattr(detection_utils.BalancedPositiveNegativeSampler, "__call__", first_of_each_kind)
    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=224,
                                              max_size=1000).double().train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    batch = detection_shapes([(224, 224)] * 4, seed=1, dtype=torch.float64)
    reference = copy.deepcopy(model)
    detection_loss(reference, batch).backward()
    expected = torch.cat([p.grad.flatten() for p in reference.parameters() if p.grad is not None])
    grads = []
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0), 4, compute_loss=detection_loss,
                        micro_batch=2, before_step=lambda ab: grads.append(
                            torch.cat([p.grad.flatten() for p in ab.model.parameters() if p.grad is not None])))
    ab.step(batch)
    assert ((grads[0] - expected).norm() / expected.norm()).item() < 1e-10


def test_two_pass_refuses_micro_batches_padded_otherwise_than_the_batch():
    # Trained BatchNorm and images of two sizes: phase 1 saw the whole batch's padding, a micro-batch its own.
    model = build("fasterrcnn_mobilenet_v3_large_fpn")
    model.transform.min_size, model.transform.max_size = (96,), 160
    before = copy.deepcopy(model.state_dict())
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.01), 4, compute_loss=detection_loss,
                        micro_batch=2)
    with pytest.raises(RuntimeError, match="pads each batch to its largest sample"):
        ab.step(detection_shapes([(96, 96)] * 2 + [(96, 160)] * 2))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # bn="micro" trains it: each micro-batch normalizes with its own statistics, as plain accumulation does.
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.01), 4, compute_loss=detection_loss,
                        micro_batch=2, bn="micro")
    assert torch.isfinite(torch.tensor(ab.step(detection_shapes([(96, 96)] * 2 + [(96, 160)] * 2))))
