import json
import logging
import multiprocessing

import pytest
import torch
from torch import nn

from autobatch.planning.cache import PlanCache, plan_key

RECORD = {"micro_batch": 12, "fixed_bytes": 100.0, "per_sample_bytes": 10.0, "points": [[2, 120], [4, 140]]}


def key(model=None, batch=None, optimizer_type=torch.optim.SGD, **settings):
    model = model or nn.Linear(3, 2)
    batch = batch if batch is not None else (torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    return plan_key(model, optimizer_type(model.parameters(), lr=0.1), batch, "Test GPU", 80 * 2**30,
                    **{"bn": "two_pass", **settings})


def test_key_changes_with_what_changes_memory():
    base = key()
    assert key() == base
    assert key(batch=(torch.randn(9, 3), torch.zeros(9, dtype=torch.long))) == base  # batch size is not part
    assert key(model=nn.Linear(4, 2), batch=(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))) != base
    assert key(batch=(torch.randn(4, 3).double(), torch.zeros(4, dtype=torch.long))) != base
    assert key(optimizer_type=torch.optim.Adam) != base
    assert key(autocast=torch.bfloat16) != base
    assert key(world_size=2) != base


def test_store_and_load(tmp_path):
    cache = PlanCache(tmp_path)
    assert cache.load("k") is None
    cache.store("k", RECORD)
    assert cache.load("k")["micro_batch"] == 12
    assert PlanCache(tmp_path).load("k")["points"] == [[2, 120], [4, 140]]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b"\xff\xfe\x00"])
def test_corrupt_file_is_ignored_with_a_warning(tmp_path, caplog, content):
    cache = PlanCache(tmp_path)
    cache.store("k", RECORD)
    cache.path("k").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        assert cache.load("k") is None
    assert str(cache.path("k")) in caplog.text
    cache.store("k", RECORD)  # and it is rewritten
    assert cache.load("k")["micro_batch"] == 12


@pytest.mark.parametrize("change", [{"format": 0}, {"micro_batch": "4"}, {"micro_batch": 2.5}, {"micro_batch": 0},
                                    {"micro_batch": True}, {"phase1_chunks": 0}, {"fixed_bytes": -1.0},
                                    {"per_sample_bytes": "10"}, {"points": [[0, 120]]}, {"points": "x"},
                                    {"lockstep_fits": "yes"}])
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
