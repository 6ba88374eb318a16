"""Hugging Face Accelerate, its launcher on 2 CPU processes and its mixed precision, against autobatch's own path."""
import os
import sys

import pytest
import torch

import autobatch
from tests.distributed_worker import data, resnet
from tests.integrations.launch import ROOT, WORKERS, launched
from tests.test_distributed import assert_same, single_process

pytestmark = pytest.mark.slow


def accelerate_launch(tmp_path, mixed_precision, scenarios):
    pytest.importorskip("accelerate")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
               "--main_process_port", "{port}",
               str(WORKERS / "accelerate_worker.py"), str(tmp_path), ",".join(scenarios)]
    launched(command, env)
    return {(bn, rank): torch.load(tmp_path / f"{mixed_precision}-{bn}-{rank}.pt")
            for bn in scenarios for rank in range(2)}


def test_accelerate_on_two_processes_equals_autobatchs_own_ddp(tmp_path):
    """accelerate launch (2 CPU processes, gloo), accelerator.prepare, then autobatch: the same step as
    one process with the whole batch, which autobatch's own DDP path equals (tests/test_distributed.py)."""
    results = accelerate_launch(tmp_path, "no", ["two_pass", "exact"])
    two_pass = single_process(resnet(), slice(0, 16), micro_batch=4, image=True)
    exact = single_process(resnet(), slice(0, 16), micro_batch=16, image=True)
    for rank in range(2):
        assert results[("two_pass", rank)]["world"] == 2
        assert_same(results[("two_pass", rank)], two_pass)
        assert_same(results[("exact", rank)], exact)


def test_accelerate_mixed_precision_equals_autobatchs_autocast(tmp_path):
    results = accelerate_launch(tmp_path, "bf16", ["two_pass"])
    model = resnet().float()
    x, y = data(image=True)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.5), 16, torch.nn.CrossEntropyLoss(),
                        micro_batch=4, autocast_dtype=torch.bfloat16, bn="two_pass")
    loss = ab.step(x.float(), y)
    for rank in range(2):
        result = results[("two_pass", rank)]
        assert result["loss"][0] == pytest.approx(loss, rel=1e-5)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
