"""The plan: a user's micro-batch, its balanced splits, and how it prints."""
from autobatch.modes import Mode
from autobatch.plan import Phase1, fixed_plan


def test_user_micro_batch():
    plan = fixed_plan(16, 7)
    assert (plan.micro_batch, plan.splits, plan.source) == (7, [6, 5, 5], "user")
    assert fixed_plan(16, 64).splits == [16]


def test_plan_prints_as_a_table():
    text = str(fixed_plan(16, 7))
    assert "splits        [6, 5, 5]" in text and "source        user" in text


def test_the_mode_is_a_value_that_reads_as_its_name():
    plan = fixed_plan(16, 4, bn=Mode.MICRO)
    assert plan.bn is Mode.MICRO and plan.bn == "micro" and "bn            micro" in str(plan)
    assert fixed_plan(16, 4, bn="exact").bn is Mode.EXACT


def test_phase_one_says_when_its_statistics_are_approximate():
    assert "approximate" in str(Phase1.chunked(4)) and Phase1.chunked(1) == Phase1.whole()
    assert "phase 1" in str(fixed_plan(16, 4, phase1=Phase1.chunked(2)))
