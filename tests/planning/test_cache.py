import json
import logging
import multiprocessing
import os
import stat

import pytest
import torch
from torch import nn

from autobatch.planning.cache import PlanCache, plan_key
from autobatch.planning.memory import Budget
from autobatch.planning.record import PlanRecord

RECORD = PlanRecord(capacity=12, points=[(2, 108, 120), (4, 108, 140)], resident_per_element=0.5)


def key(model=None, batch=None, optimizer_type=torch.optim.SGD, **settings):
    model = model or nn.Linear(3, 2)
    batch = batch if batch is not None else (torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    return plan_key(model, optimizer_type(model.parameters(), lr=0.1), batch, "Test GPU", 80 * 2**30,
                    **{"bn": "two_pass", **settings})


def test_key_changes_with_what_changes_memory():
    base = key()
    assert key() == base
    assert key(batch=(torch.randn(9, 3), torch.zeros(9, dtype=torch.long))) == base  # batch size is not part
    # Nor are the sizes a sample may vary in: the memory model follows them.
    assert key(model=nn.Conv2d(3, 2, 3), batch=torch.randn(4, 3, 8, 8)) == key(model=nn.Conv2d(3, 2, 3),
                                                                              batch=torch.randn(4, 3, 16, 24))
    assert key(model=nn.Linear(4, 2), batch=(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))) != base
    assert key(batch=(torch.randn(4, 3).double(), torch.zeros(4, dtype=torch.long))) != base
    assert key(optimizer_type=torch.optim.Adam) != base
    assert key(autocast=torch.bfloat16) != base
    assert key(world_size=2) != base


def test_store_and_load(tmp_path):
    cache = PlanCache(tmp_path)
    assert cache.load("k") is None
    cache.store("k", RECORD)
    assert cache.load("k").capacity == 12
    assert PlanCache(tmp_path).load("k") == RECORD


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b"\xff\xfe\x00"])
def test_corrupt_file_is_ignored_with_a_warning(tmp_path, caplog, content):
    cache = PlanCache(tmp_path)
    cache.store("k", RECORD)
    cache.path("k").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        assert cache.load("k") is None
    assert str(cache.path("k")) in caplog.text
    cache.store("k", RECORD)  # and it is rewritten
    assert cache.load("k").capacity == 12


@pytest.mark.parametrize("change", [{"format": 0}, {"capacity": "4"}, {"capacity": 2.5}, {"capacity": 0},
                                    {"capacity": True}, {"phase1_chunks": 0}, {"resident_per_element": -1.0},
                                    {"phase1_base": "10"}, {"points": [[0, 108, 120]]}, {"points": [[2, 120]]},
                                    {"points": "x"}, {"points": []}, {"phase1_points": [[2, 0, 5]]},
                                    {"bn": "frozen"}, {"budget_bytes": "1GiB"}, {"resident_per_element": 1e308},
                                    {"points": [[2, 108, 1e308]]}, {"points": [[2, 10**30, 120]]}])
def test_an_invalid_record_is_ignored_with_a_warning(tmp_path, caplog, change):
    cache = PlanCache(tmp_path)
    cache.store("k", RECORD)
    cache.path("k").write_text(json.dumps({**json.loads(cache.path("k").read_text()), **change}))
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        assert cache.load("k") is None
    assert str(cache.path("k")) in caplog.text


def test_unwritable_directory_warns_and_leaves_no_temporary_file(tmp_path, caplog, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        PlanCache(blocker / "sub").store("k", RECORD)
    assert "cannot write the plan cache" in caplog.text

    def refuse(*args):
        raise PermissionError("refused")

    monkeypatch.setattr("os.replace", refuse)
    PlanCache(tmp_path).store("k", RECORD)
    assert list((tmp_path / "plans").iterdir()) == []


def _store_many(directory, worker):
    cache = PlanCache(directory)
    for index in range(50):
        cache.store(f"{worker}-{index}", RECORD)


@pytest.mark.slow
def test_concurrent_launches_keep_every_record(tmp_path):
    processes = [multiprocessing.get_context("spawn").Process(target=_store_many, args=(tmp_path, worker))
                 for worker in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    cache = PlanCache(tmp_path)
    assert all(cache.load(f"{worker}-{index}") is not None for worker in range(4) for index in range(50))


def test_key_sees_module_configuration_and_optimizer_settings():
    def conv_key(stride, amsgrad=False):
        model = nn.Conv2d(3, 4, 3, stride=stride)
        batch = (torch.randn(2, 3, 8, 8), torch.zeros(2))
        return plan_key(model, torch.optim.Adam(model.parameters(), amsgrad=amsgrad), batch, "Test GPU", 2**30)

    assert conv_key(1) == conv_key(1)
    assert conv_key(2) != conv_key(1)  # the same parameter shapes, other activations
    assert conv_key(1, amsgrad=True) != conv_key(1)  # one more state tensor per parameter


@pytest.mark.parametrize("content", [b"[" * 200_000 + b"]" * 200_000, b'{"a": "' + b"x" * (2 << 20) + b'"}'],
                         ids=["nested too deep", "too large"])
def test_a_file_no_plan_record_could_be_is_ignored_without_reading_it_whole(tmp_path, caplog, content):
    cache = PlanCache(tmp_path)
    cache.store("k", RECORD)
    cache.path("k").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        assert cache.load("k") is None  # no RecursionError, no megabytes parsed
    assert "ignoring the unreadable plan cache file" in caplog.text


@pytest.mark.parametrize("change, problem", [({"phase1_chunks": 1000}, "phase1_chunks 1000 is more than"),
                                             ({"capacity": 40}, "larger than this run's batch"),
                                             ({"points": [[64, 108, 100]]}, "more samples than"),
                                             ({"bn": "auto"}, "not a mode a plan runs")])
def test_a_record_out_of_range_for_this_run_is_ignored(tmp_path, caplog, change, problem):
    cache = PlanCache(tmp_path)
    cache.store("k", RECORD)
    cache.path("k").write_text(json.dumps({**RECORD.to_json(), **change}))
    assert cache.load("k") is not None or "bn" in change  # a record of some run: only this run's ranges refuse it
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        assert cache.load("k", share=16) is None
    assert problem in caplog.text


def test_cache_files_are_as_readable_as_the_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        PlanCache(tmp_path).store("k", RECORD)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(PlanCache(tmp_path).path("k")).st_mode) == 0o644


def test_a_cached_whole_batch_plan_over_todays_budget_is_measured_afresh(caplog):
    import autobatch
    from tests.common import ResidualNet, data

    def wrapped(budget):
        torch.manual_seed(0)
        model = ResidualNet(blocks=1).double()
        return autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, nn.CrossEntropyLoss(),
                              bn="exact", memory_budget=budget)

    x, y = data(8)
    plan = wrapped(10**9).tune(x, y)
    assert plan.source == "measured" and plan.bn == "exact"
    again = wrapped(10**9)
    assert again.tune(x, y).source == "cache"
    # Today the same key (the same budget setting) finds less memory free: a device shared with another job.
    with caplog.at_level(logging.WARNING, logger="autobatch"), pytest.MonkeyPatch.context() as patch:
        patch.setattr("autobatch.planning.planner.budget", lambda memory, cap: Budget(
            int(plan.predicted_peak_bytes * 0.9), memory.capacity_bytes, None, 0.1))
        with pytest.raises(MemoryError, match="bn='exact' does not fit"):
            wrapped(10**9).tune(x, y)
    assert "over today's budget" in caplog.text


@pytest.mark.parametrize("kind", ["link to /dev/zero", "fifo"])
def test_a_cache_path_that_is_no_regular_file_is_ignored_without_reading_or_waiting(tmp_path, caplog, kind):
    cache = PlanCache(tmp_path)
    cache.store("k", RECORD)
    path = cache.path("k")
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        assert cache.load("k") is None
    assert "not a regular file" in caplog.text
