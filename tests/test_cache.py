import json
import logging

import pytest
import torch
from torch import nn

from autobatch.cache import PlanCache, plan_key

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


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_corrupt_file_is_ignored_with_a_warning(tmp_path, caplog, text):
    (tmp_path / "plans.json").write_text(text)
    cache = PlanCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        assert cache.load("k") is None
    assert "corrupt plan cache" in caplog.text
    cache.store("k", RECORD)  # and it is rewritten
    assert cache.load("k")["micro_batch"] == 12


def test_stale_record_is_ignored(tmp_path, caplog):
    (tmp_path / "plans.json").write_text(json.dumps({"k": {"format": 0, "micro_batch": 3}}))
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        assert PlanCache(tmp_path).load("k") is None
    assert "stale" in caplog.text


def test_unwritable_directory_warns(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        PlanCache(blocker / "sub").store("k", RECORD)
    assert "cannot write the plan cache" in caplog.text
