import pytest

from autobatch.planning.search import Fit, search, shrink


def linear(fixed, per_sample, calls, oom_above=None):
    def measure(n):
        calls.append(n)
        if oom_above is not None and n > oom_above:
            return None
        return fixed + per_sample * n
    return measure


@pytest.mark.parametrize("answer", [1, 2, 3, 5, 17, 50, 63])
def test_linear_memory_is_found_in_at_most_four_trials(answer):
    calls = []
    budget = 1000 + 37 * answer + 36  # one byte short of answer + 1
    fit = search(linear(1000, 37, calls), budget, 64)
    assert fit.capacity == answer
    assert fit.trials == len(set(calls)) <= 4
    assert fit.predict(answer) <= budget < fit.predict(answer + 1)


def test_whole_batch_fits():
    calls = []
    fit = search(linear(1000, 37, calls), 10**9, 16)
    assert fit.capacity == 16 and len(calls) <= 4


def test_failed_verification_bisects():
    calls = []

    def measure(n):  # a jump above 20 samples the line cannot foresee
        calls.append(n)
        return 1000 + 37 * n + (10_000 if n > 20 else 0)

    fit = search(measure, 1000 + 37 * 50, 64)
    assert fit.capacity == 20
    assert measure(20) <= 1000 + 37 * 50 < measure(21)
    assert len(calls) <= 12


def test_out_of_memory_counts_as_too_large():
    calls = []
    fit = search(linear(1000, 37, calls, oom_above=7), 10**9, 64)
    assert fit.capacity == 7
    assert (8, None) in fit.points or any(peak is None for _, peak in fit.points)


def test_nothing_fits():
    with pytest.raises(MemoryError, match="not even a micro-batch of one sample"):
        search(linear(1000, 37, []), 500, 16)


@pytest.mark.parametrize("target", [1, 2, 3])
def test_tiny_targets(target):
    fit = search(linear(10, 1, []), 10**6, target)
    assert fit.capacity == target


def test_fit_line_through_points():
    fit = Fit(4, 100.0, 10.0, ((2, 120), (4, 140)))
    assert fit.largest_under(175, 64) == 7
    assert fit.largest_under(10**6, 64) == 64
    assert fit.largest_under(50, 64) == 1


def test_shrink():
    assert shrink(10) == 8 and shrink(2) == 1
    with pytest.raises(MemoryError):
        shrink(1)
