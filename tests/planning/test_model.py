"""The memory model: micro-batches that follow the samples' size, never over the budget, from few trials."""
import pytest
import torch
from torch import nn

import autobatch
from autobatch.demo import models
from autobatch.planning.measure import peak_bytes
from autobatch.planning.model import MemoryModel
from bench.variable_shapes import largest_that_fits
from tests.common import data


def two_conv_net():
    torch.manual_seed(0)
    return models.two_conv_net()


def Encoder():  # noqa: N802 - reads as the class it makes
    return models.AttentionEncoder()


def sequences(n, length, seed):
    generator = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(1, 50, (n, length), generator=generator),
            "labels": torch.randint(0, 50, (n, length), generator=generator)}


def token_loss(model, batch):
    logits = model(batch["tokens"])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    return loss, batch["labels"].numel()


def run(ab, batches):
    """Every step's measured peak (host, every tensor followed), and its plan."""
    peaks, plans = [], []
    for batch in batches:
        peaks.append(peak_bytes(lambda: ab.step(batch), torch.device("cpu"), ab.model, ab.optimizer,
                                ab._micro.batches.tensors(batch)))
        plans.append(ab.plan)
    return peaks, plans


def image_loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.slow
def test_images_of_changing_size_stay_within_the_budget_with_few_trials():
    budget = 40 * 2**20
    sizes = [32, 64, 16, 96, 32, 16, 64, 96, 96, 32, 64, 16, 32, 96, 64, 16, 32, 64, 96, 32]
    batches = [data(32, (3, size, size), seed=i, dtype=torch.float32) for i, size in enumerate(sizes)]
    model = two_conv_net()
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), 32,
                        compute_loss=image_loss, memory_budget=budget,
                        bn=autobatch.TwoPass(phase1_memory_format=torch.preserve_format))
    peaks, plans = run(ab, batches)
    assert max(peaks) <= budget, [f"{p / budget:.2f}" for p in peaks]
    assert ab._planner.setting.trials.steps <= 6
    assert max(chosen_splits := [max(plan.splits) for plan in plans]) == 32 and min(chosen_splits) < 32
    # Each size's last plan, the model's, against the largest that fits the planner's budget (its 10% margin kept).
    chosen = {plan.sample_size: plan for plan in plans}
    for size in (64, 96):
        plan = chosen[3 * size * size + 1]
        batch = next(b for b, s in zip(batches, sizes) if s == size)
        best = largest_that_fits(two_conv_net, image_loss, batch, ab.plan.budget_bytes, 32, plan.phase1_chunks)
        assert abs(max(plan.splits) - best) <= 1, (size, plan, best)


@pytest.mark.slow
def test_padded_sequences_of_changing_length_stay_within_the_budget_with_few_trials():
    budget = 8 * 2**20
    lengths = [64, 128, 16, 256, 32, 64, 200, 16, 128, 256, 48, 96, 160, 16, 256, 64, 128, 32, 224, 80]
    batches = [sequences(32, length, seed) for seed, length in enumerate(lengths)]
    torch.manual_seed(0)
    model = Encoder()
    # The projected two_pass: the precise backward's own memory (the whole batch's gradients at its cuts) is not
    # yet in the memory model, and passed this budget (1.16x at 128 tokens); open in the notes of #38.
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), 32,
                        compute_loss=token_loss, memory_budget=budget, bn="two_pass")
    peaks, plans = run(ab, batches)
    assert max(peaks) <= budget, [f"{p / budget:.2f}" for p in peaks]
    assert ab._planner.setting.trials.steps <= 6
    assert "quadratic" in ab.plan.memory_model  # attention in plain matrix products: chosen from the measurements
    chosen = {plan.sample_size: plan for plan in plans}
    assert max(chosen[2 * 256].splits) < 32  # the budget splits the longest batches
    for length in (128, 256):
        plan = chosen[2 * length]
        batch = next(b for b, n in zip(batches, lengths) if n == length)
        best = largest_that_fits(lambda: (torch.manual_seed(0), Encoder())[1], token_loss, batch,
                                 ab.plan.budget_bytes, 32, plan.phase1_chunks)
        assert abs(max(plan.splits) - best) <= 1, (length, plan, best)


def test_the_model_bounds_what_it_has_not_measured():
    model = MemoryModel(points=[(2, 100, 1200), (4, 100, 1400)])  # fixed 1000, 100 bytes per sample
    assert model.predict(10, 100) == 2000
    assert model.per_sample(50) == 100  # smaller samples: at most the smallest measured's
    assert model.per_sample(200) == 400  # larger: at most quadratic growth, until measured
    model.add(3, 200, 1000 + 3 * 200)  # measured: linear
    assert model.form()[0] == "linear" and model.per_sample(150) == pytest.approx(150)
    assert model.largest_under(2000, 150, 64) == 6


def test_the_model_chooses_quadratic_growth_where_the_measurements_ask_for_it():
    model = MemoryModel()
    for s in (10, 20, 40, 80):
        model.add(1, s, 1000 + s * s)
        model.add(2, s, 1000 + 2 * s * s)
    form, (a, b, c) = model.form()
    assert form == "quadratic" and c == pytest.approx(1.0, rel=1e-6)
    linear = MemoryModel()
    for s in (10, 20, 40):
        linear.add(1, s, 500 + 3 * s)
        linear.add(2, s, 500 + 6 * s)
    assert linear.form()[0] == "linear"


def test_an_update_that_dominates_the_peak_hides_no_growth_of_the_micro_batches():
    """#29: an optimizer update larger than any micro-batch's activations made every trial's peak the same,
    and a model fitted to those totals saw 0 bytes per sample: a batch of larger samples ran unsplit, over the
    budget. Measured apart, the micro-batches' growth stays visible and bounds the larger size."""
    from autobatch.planning.model import MemoryModel

    s, fixed, per_sample, update = 100, 1_000, 1_000, 50_000
    stages = {n: (fixed + n * per_sample, update) for n in (2, 4, 8)}
    totals = MemoryModel(0.0, [(n, s, max(peaks)) for n, peaks in stages.items()])
    assert totals.per_sample(s) == 0 and totals.largest_under(60_000, 4 * s, 64) == 64  # the old reading
    model = MemoryModel(0.0, [(n, s, peaks[0]) for n, peaks in stages.items()], updates={s: update})
    assert model.predict(4, s) == update and model.predict(100, s) == fixed + 100 * per_sample
    assert model.largest_under(60_500, s, 64) == 59
    n = model.largest_under(60_500, 4 * s, 64)  # beyond the measured size: at most quadratic growth
    assert n == 3 and model.predict(n, 4 * s) <= 60_500
    assert model.largest_under(40_000, s, 64) == 1  # the update alone passes the budget


def test_a_trial_never_passes_the_budget():
    """#39: the first step's trials had peaked at 1.33x memory_budget (timm efficientnet_b0, 120 MiB). A trial on
    the host now stops, out of memory, the moment its live tensors pass the budget: here the whole batch of
    twice the length, tried under bn="exact", does not fit, and finding that out stays within the budget."""
    budget = 8 * 2**20
    torch.manual_seed(0)
    model = Encoder()
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), 32,
                        compute_loss=token_loss, memory_budget=budget, bn="exact", cache=False)
    ab.step(sequences(32, 64, 0))
    longer = sequences(32, 128, 1)
    peaks = []

    def step():
        try:
            ab.step(longer)
        except autobatch.PlanDoesNotFit as error:
            peaks.append(str(error))

    peak = peak_bytes(step, torch.device("cpu"), ab.model, ab.optimizer, ab._micro.batches.tensors(longer))
    assert peaks and "bn='exact' does not fit" in peaks[0]
    assert peak <= budget, f"{peak / budget:.2f}x the budget"
