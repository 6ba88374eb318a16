import pytest

from autobatch.planner import Plan, check_micro_batch, check_target_batch, make_plan


def test_user_micro_batch():
    plan = make_plan(16, 7)
    assert (plan.micro_batch, plan.splits, plan.source) == (7, [6, 5, 5], "user")


def test_micro_batch_larger_than_target_holds_the_whole_batch():
    plan = make_plan(16, 64)
    assert (plan.micro_batch, plan.splits) == (16, [16])


def test_auto_without_measurement_runs_the_whole_batch():
    plan = make_plan(16, "auto")
    assert (plan.micro_batch, plan.splits, plan.source) == (16, [16], "auto")


def test_plan_prints_as_a_table():
    text = str(make_plan(16, 7))
    assert "splits        [6, 5, 5]" in text and "source        user" in text


@pytest.mark.parametrize("value", [0, -3, 1.5, "8", True, None])
def test_bad_target_batch(value):
    with pytest.raises(ValueError, match="target_batch must be a positive int"):
        check_target_batch(value)


@pytest.mark.parametrize("value", [0, -1, 2.0, "max", False])
def test_bad_micro_batch(value):
    with pytest.raises(ValueError, match="micro_batch must be 'auto' or a positive int"):
        check_micro_batch(value)


def test_plan_is_frozen():
    with pytest.raises(Exception):
        make_plan(8, 2).micro_batch = 3
    assert isinstance(make_plan(8, 2), Plan)
