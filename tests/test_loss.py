"""Count-weighted losses, ``(loss_sum, count)``: the logical batch's sum over its counted items, in float64."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autobatch
from autobatch.loss import Losses, check_counts, read_loss
from autobatch.reference import cosine, flat_grad, relative_error
from tests.common import (
    ResidualNet,
    TinyLanguageModel,
    assert_same_state,
    model_state,
    padded_sequences,
    token_loss_mean,
    token_loss_sum,
)

#: Length-grouped, as a length-grouped sampler gives them: the short sequences' tokens in one micro-batch.
GROUPED = [2, 3, 2, 3, 12, 11, 12, 10]
MIXED = [2, 12, 3, 11, 2, 12, 3, 10]


def language_model():
    torch.manual_seed(0)
    return TinyLanguageModel().double()


def reference_step(model, batches, lr=0.1, momentum=0.9, max_grad_norm=None):
    """The full batch itself: mean loss over every valid token, one SGD step per batch; the gradients of the
    last step and the losses."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses, grad = [], None
    for batch in batches:
        optimizer.zero_grad()
        loss = token_loss_mean(model, batch)
        loss.backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        grad = flat_grad(model)
        optimizer.step()
        losses.append(loss.item())
    return model, grad, losses


def autobatch_steps(model, batches, micro_batch, lr=0.1, momentum=0.9, compute_loss=token_loss_sum, **options):
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    grads = []
    ab = autobatch.wrap(model, optimizer, len(batches[0]["tokens"]), compute_loss=compute_loss,
                        micro_batch=micro_batch, before_step=lambda ab: grads.append(flat_grad(ab.model)), **options)
    losses = [ab.step(batch) for batch in batches]
    return model, grads[-1], losses


@pytest.mark.parametrize("lengths", [GROUPED, MIXED], ids=["length-grouped", "mixed"])
@pytest.mark.parametrize("micro_batch", [1, 3, 4, 8])
def test_count_weighted_loss_gives_the_full_batch_gradient(lengths, micro_batch):
    model, batch = language_model(), padded_sequences(lengths)
    reference, grad, losses = reference_step(model, [batch])
    trained, got, got_losses = autobatch_steps(model, [batch], micro_batch)
    assert relative_error(got, grad) < 1e-10
    assert got_losses[0] == pytest.approx(losses[0], rel=1e-12)
    for p, q in zip(trained.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_a_mean_per_micro_batch_is_not_the_full_batch_gradient():
    # What the pair fixes: each micro-batch's token mean, weighted by its samples (the test above can fail).
    model, batch = language_model(), padded_sequences(GROUPED)
    _, grad, _ = reference_step(model, [batch])
    _, got, _ = autobatch_steps(model, [batch], 4, compute_loss=token_loss_mean)
    assert relative_error(got, grad) > 0.1 and cosine(got, grad) < 0.99


def test_consecutive_steps_with_different_counts_follow_the_full_batch():
    # The shared weight comes from the previous step's count; the result must not depend on it.
    model = language_model()
    batches = [padded_sequences(GROUPED, seed=1), padded_sequences([1, 1, 2, 1, 2, 1, 1, 2], seed=2),
               padded_sequences([20, 18, 19, 20, 17, 20, 16, 20], seed=3)]
    reference, grad, losses = reference_step(model, batches)
    trained, got, got_losses = autobatch_steps(model, batches, 3)
    assert relative_error(got, grad) < 1e-10
    assert got_losses == pytest.approx(losses, rel=1e-12)
    for p, q in zip(trained.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_clipping_sees_the_true_gradient():
    model, batch = language_model(), padded_sequences(GROUPED)
    reference, grad, _ = reference_step(model, [batch], max_grad_norm=0.05)
    trained, got, _ = autobatch_steps(model, [batch], 3, max_grad_norm=0.05)
    assert relative_error(got, grad) < 1e-10
    for p, q in zip(trained.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_a_micro_batch_without_items_is_fine():
    # Two sequences without a single label: their micro-batch's count is 0 and its sum 0.
    model, batch = language_model(), padded_sequences([5, 7, 0, 0])
    reference, grad, losses = reference_step(model, [batch])
    _, got, got_losses = autobatch_steps(model, [batch], 2)
    assert relative_error(got, grad) < 1e-10 and got_losses[0] == pytest.approx(losses[0], rel=1e-12)


def test_loss_fn_may_return_the_pair():
    model, batch = language_model(), padded_sequences(MIXED)
    _, grad, _ = reference_step(model, [batch])

    def criterion(logits, labels):
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        return loss, int((labels != -100).sum())

    grads = []
    trained = copy.deepcopy(model)
    ab = autobatch.wrap(trained, torch.optim.SGD(trained.parameters(), lr=0.1), 8, criterion, micro_batch=3,
                        before_step=lambda ab: grads.append(flat_grad(ab.model)))
    ab.step(batch["tokens"], batch["labels"])
    assert relative_error(grads[0], grad) < 1e-10


def segmentation_data(n=8, seed=0):
    """Images and per-pixel labels with an ignored border of varying width (255, as segmentation datasets mark it)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 5, (n, 8, 8), generator=generator)
    for row in range(n):
        y[row, : row % 4 + 1] = 255
    return x, y


class Segmenter(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = ResidualNet(blocks=1)
        self.classify = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        body = self.body
        features = body.blocks(F.relu(body.bn(body.stem(x))))
        return self.classify(features)


def test_exact_mode_with_a_per_pixel_loss_equals_the_full_batch():
    torch.manual_seed(0)
    model = Segmenter().double()
    x, y = segmentation_data()
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y, ignore_index=255).backward()
    grads = []
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, bn="exact",
                        loss_fn=lambda out, y: (F.cross_entropy(out, y, ignore_index=255, reduction="sum"),
                                                (y != 255).sum()),
                        before_step=lambda ab: grads.append(flat_grad(ab.model)))
    ab.step(x, y)
    assert relative_error(grads[0], flat_grad(reference)) < 1e-10


def bad_counts():
    yield "negative", lambda n: -1, ValueError, "count of micro-batch 0 is -1.0"
    yield "not finite", lambda n: float("nan"), ValueError, "is nan"
    yield "not whole", lambda n: torch.tensor(2.5), ValueError, "whole number"
    yield "all zero", lambda n: 0, ValueError, "count is 0"
    yield "not a number", lambda n: "3", TypeError, "count of micro-batch 0 is str"
    yield "mixed", lambda n: None, TypeError, "micro-batch 1's loss is a mean but micro-batch 0's was a pair"


@pytest.mark.parametrize("count, kind, message", [c[1:] for c in bad_counts()], ids=[c[0] for c in bad_counts()])
def test_a_bad_count_is_refused_with_the_model_unchanged(count, kind, message):
    model, batch = language_model(), padded_sequences(MIXED)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    calls = []

    def compute_loss(model, part):
        calls.append(len(part["tokens"]))
        loss, _ = token_loss_sum(model, part)
        value = count(len(calls))
        return loss if value is None and len(calls) > 1 else (loss, 0 if value is None else value)

    before = model_state(model)
    ab = autobatch.wrap(model, optimizer, 8, compute_loss=compute_loss, micro_batch=4)
    with pytest.raises(kind, match=message):
        ab.step(batch)
    assert_same_state(before, model_state(model))
    assert not optimizer.state


def test_read_loss_forms():
    assert not read_loss(torch.tensor(2.0), 0).count_weighted
    pair = read_loss((torch.tensor([3.0]), 4), 0)
    assert pair.count_weighted and pair.value.shape == () and pair.count.item() == 4
    assert read_loss((torch.tensor(3.0), torch.tensor([7])), 0).count.item() == 7
    with pytest.raises(ValueError, match="not a scalar tensor"):
        read_loss(torch.ones(3), 2)
    with pytest.raises(ValueError, match="first item is shape"):
        read_loss((torch.ones(3), 2), 0)
    with pytest.raises(ValueError, match="count of micro-batch 1 has shape"):
        read_loss((torch.tensor(1.0), torch.ones(2)), 1)
    with pytest.raises(TypeError, match=r"bool tensor .*mask.sum\(\)"):
        read_loss((torch.tensor(3.0), torch.tensor([True, False]).any()), 0)
    with pytest.raises(TypeError, match="count of micro-batch 0 is bool"):
        read_loss((torch.tensor(3.0), True), 0)


def test_check_counts_ignores_padding_micro_batches():
    assert check_counts([3.0, 0.0], [2, 2], None) is None
    assert check_counts([3.0, -1.0], [2, 0], None) is None  # a padding micro-batch's count is left out
    assert "on rank 1" in str(check_counts([1.5], [2], 1))


def test_losses_weigh_samples_or_share_one_weight():
    by_samples = Losses(world_size=2, samples=8, reference=None)
    assert by_samples.add(read_loss(torch.tensor(1.0), 0), 3).item() == pytest.approx(3 * 2 / 8)
    counted = Losses(world_size=2, samples=8, reference=40.0)
    assert counted.add(read_loss((torch.tensor(1.0), 7), 0), 3).item() == pytest.approx(2 / 40)
    assert counted.add(read_loss((torch.tensor(1.0), 7), 1), 0).item() == 0.0  # padding
    assert counted.settle(10.0, 20.0) == 0.5 and counted.total == 20.0


def test_a_plain_mean_over_labels_with_ignored_entries_is_said_once_with_the_pair_to_return(caplog):
    model, batch = language_model(), padded_sequences(GROUPED)
    with caplog.at_level("WARNING", logger="autobatch"):
        autobatch_steps(model, [batch, batch], 4, compute_loss=token_loss_mean)
    said = [r.getMessage() for r in caplog.records if "-100" in r.getMessage()]
    assert len(said) == 1 and "(loss_sum, count)" in said[0] and "batch['labels'][..., 1:]" in said[0]


def test_targets_with_ignored_entries_under_loss_fn_are_said_too(caplog):
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.tensor([0, 1, -100, 2, 1, -100, -100, 0])
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, nn.CrossEntropyLoss(), micro_batch=4)
    with caplog.at_level("WARNING", logger="autobatch"):
        ab.step(x, y)
    assert any("-100" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("ignored_from", [4, 8], ids=["later rows", "a later batch"])
def test_ignored_labels_outside_the_first_micro_batch_are_said_too(caplog, ignored_from):
    """#39: a length-grouped batch pads its later rows only; the first micro-batch's labels had been all
    that was looked at, once per wrap."""
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, -100, -100, 0])
    clean = torch.tensor([0, 1, 2, 2, 1, 0, 1, 0])
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, nn.CrossEntropyLoss(), micro_batch=4)
    with caplog.at_level("WARNING", logger="autobatch"):
        if ignored_from == 8:
            ab.step(x, clean)
        ab.step(x, y)
        ab.step(x, y)
    assert len([r for r in caplog.records if "-100" in r.getMessage()]) == 1


@pytest.mark.parametrize("compute_loss, micro_batch", [(token_loss_sum, 4), (token_loss_mean, 8)])
def test_nothing_is_said_for_the_pair_or_an_unsplit_batch(caplog, compute_loss, micro_batch):
    model, batch = language_model(), padded_sequences(GROUPED)
    with caplog.at_level("WARNING", logger="autobatch"):
        autobatch_steps(model, [batch], micro_batch, compute_loss=compute_loss)
    assert not [r for r in caplog.records if "-100" in r.getMessage()]
