"""wrap's options: checked once, before anything changes, every error naming the problem and the fix."""

import pytest
import torch
from torch import nn

import autobatch
from autobatch.modes import TwoPass
from autobatch.options import Options, check_micro_batch, check_target_batch
from tests.common import ResidualNet, assert_same_state, data, model_state


def build(**options):
    model = nn.Linear(3, 2)
    return Options.build(model, torch.optim.SGD(model.parameters(), lr=0.1), options.pop("target_batch", 8),
                         options.pop("world_size", 1), **{"loss_fn": nn.MSELoss(), **options})


@pytest.mark.parametrize("value", [0, -3, 1.5, "8", True, None])
def test_bad_target_batch(value):
    with pytest.raises(ValueError, match="target_batch must be a positive int"):
        check_target_batch(value)


@pytest.mark.parametrize("value", [0, -1, 2.0, "max", False])
def test_bad_micro_batch(value):
    with pytest.raises(ValueError, match="micro_batch must be 'auto' or a positive int"):
        check_micro_batch(value)


def test_one_declaration_says_what_the_ranks_agree_on_and_what_keys_the_cache():
    options = build(micro_batch=4, autocast_dtype=torch.bfloat16)
    assert set(options.agreed()) == {"target_batch", "micro_batch", "bn"}
    assert options.agreed()["micro_batch"] == 4.0
    assert set(options.keyed()) == {"target_batch", "compute_loss", "bn", "autocast_dtype", "memory_budget",
                                    "update_copies"}
    assert options.keyed()["autocast_dtype"] == "torch.bfloat16"
    # A setting the ranks must share moves the compared number; one that does not, does not.
    assert build(bn=TwoPass(precise=True)).agreed()["bn"] != build().agreed()["bn"]
    assert build(max_grad_norm=1.0).agreed() == build().agreed()


@pytest.mark.parametrize("loss_fn, message", [
    (nn.CrossEntropyLoss, r"class CrossEntropyLoss, not a function; pass an instance: loss_fn=CrossEntropyLoss\(\)"),
    ("mse", "loss_fn must be callable"),
    (lambda outputs: outputs.sum(), "called as loss_fn\\(outputs, targets\\) with two arguments, but <lambda> takes 1"),
    (lambda a, b, c: a.sum(), "takes 3"),
])
def test_a_loss_that_cannot_be_called_so_is_refused_at_wrap(loss_fn, message):
    with pytest.raises(TypeError, match=message):
        build(loss_fn=loss_fn)


def test_losses_that_can_be_called_so_are_accepted():
    for loss_fn in (nn.CrossEntropyLoss(), torch.nn.functional.mse_loss, lambda outputs, targets, weight=None: 0,
                    lambda *args: 0):
        assert build(loss_fn=loss_fn).loss_fn is loss_fn
    compute_loss = lambda model, batch: model(batch).sum()  # noqa: E731
    assert build(loss_fn=None, compute_loss=compute_loss).compute_loss is compute_loss


def test_the_moved_keywords_still_work_and_say_where_they_went():
    model = ResidualNet(blocks=1)
    with pytest.warns(DeprecationWarning, match=r"use bn=autobatch.TwoPass\(phase1_memory_format=...\)"):
        ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, nn.CrossEntropyLoss(),
                            micro_batch=4, phase1_memory_format=torch.preserve_format)
    assert ab.options.bn == TwoPass(phase1_memory_format=torch.preserve_format, precise=None)  # auto's, at 4
    with pytest.warns(DeprecationWarning, match="use cache='refresh'"):
        ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, nn.CrossEntropyLoss(),
                            retune=True)
    assert ab.options.refresh_cache
    # The removed lockstep is refused, before anything changes, with what to do instead.
    with pytest.raises(TypeError, match="lockstep .* was removed"):
        autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, nn.CrossEntropyLoss(), lockstep=False)


def test_cache_refresh_measures_afresh_and_keeps_the_result():
    x, y = data(8)

    def plan(cache):
        model = ResidualNet(blocks=1).double()
        return autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, nn.CrossEntropyLoss(),
                              memory_budget=10**9, cache=cache).tune(x, y)

    assert plan(True).source == "measured"
    assert plan(True).source == "cache"
    assert plan("refresh").source == "measured"
    assert plan(False).source == "measured"
    with pytest.raises(TypeError, match="cache must be True, False, 'refresh' or a directory"):
        plan(3)


def test_a_bad_option_changes_nothing():
    model = ResidualNet(blocks=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model_state(model)
    for bad in (dict(max_grad_norm=-1.0), dict(grow_after=0), dict(update_copies="disk"), dict(bn="frozen"),
                dict(micro_batch=4, memory_budget="1GiB"), dict(micro_batch=4, bn="exact")):
        with pytest.raises((ValueError, TypeError)):
            autobatch.wrap(model, optimizer, 8, nn.CrossEntropyLoss(), **bad)
    assert_same_state(before, model_state(model))


def test_a_model_with_nothing_to_train_is_refused_at_wrap():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 4, nn.MSELoss())


def test_budgets_that_cannot_be_read_name_the_problem():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="not a finite memory size"):
        autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 4, nn.MSELoss(), memory_budget="1e400")


def test_a_replaced_loss_fn_is_what_the_options_say_and_what_runs():
    model = ResidualNet(blocks=1).double()
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0), 8, nn.CrossEntropyLoss(), micro_batch=4,
                        cache=False)
    x, y = torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (8,))
    calls = []

    def counting(outputs, targets):
        calls.append(len(targets))
        return nn.functional.cross_entropy(outputs, targets)

    ab.loss_fn = counting
    assert ab.loss_fn is counting and ab.options.loss_fn is counting
    ab.step(x, y)
    assert calls == [4, 4]
