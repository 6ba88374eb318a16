"""The plan: a user's micro-batch, its balanced splits, and how it prints."""
import pytest

from autobatch.modes import Mode
from autobatch.plan import fixed_plan


def test_user_micro_batch():
    plan = fixed_plan(16, 7)
    assert (plan.capacity, plan.splits, plan.source) == (7, [6, 5, 5], "user")
    assert fixed_plan(16, 64).splits == [16]


def test_plan_prints_as_a_table():
    text = str(fixed_plan(16, 7))
    assert "splits        [6, 5, 5]" in text and "source        user" in text


def test_the_mode_is_a_value_that_reads_as_its_name():
    plan = fixed_plan(16, 4, bn=Mode.MICRO)
    assert plan.bn is Mode.MICRO and plan.bn == "micro" and "bn            micro" in str(plan)
    assert fixed_plan(16, 4, bn="exact").bn is Mode.EXACT


def test_phase_one_says_when_its_statistics_are_approximate():
    assert "phase 1" not in str(fixed_plan(16, 4))
    assert "2 chunks: its statistics are approximate" in str(fixed_plan(16, 4).replace(phase1_chunks=2))
    with pytest.raises(ValueError, match="phase1_chunks must be 1 or more"):
        fixed_plan(16, 4).replace(phase1_chunks=0)


def test_the_plan_names_what_fits_and_what_runs_apart():
    """16 samples with room for 7 run as 6, 5 and 5: capacity 7, micro_batch 6, in the attribute and the table."""
    plan = fixed_plan(16, 7)
    assert (plan.capacity, plan.splits, plan.micro_batch) == (7, [6, 5, 5], 6)
    text = str(plan)
    assert "micro_batch   6 (the largest micro-batch that runs)" in text and "capacity      7" in text
    assert "capacity" not in str(fixed_plan(16, 4))  # where they are one number, one row
    assert "micro_batch   4 (given)" in str(fixed_plan(16, 4))  # the user's size, not "the largest that runs"
