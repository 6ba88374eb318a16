"""Hugging Face Accelerate (its launcher, 2 CPU processes, and its mixed precision) against autobatch's
own path; PyTorch Lightning's Trainer with autobatch in training_step."""
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

import autobatch
from tests.distributed_worker import data, resnet
from tests.test_distributed import assert_same, single_process

ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port():
    """A port nothing listens on: launches one after another must not meet the last one's port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launched(command, env, cwd=None):
    """Run a launcher; a second try on a fresh port if the first fails (once in some 40 runs a launch
    here failed before training: a port taken between probe and bind, or gloo aborting at exit), with
    both attempts' output in the failure."""
    failures = []
    for _ in range(2):
        env = dict(env, MASTER_PORT=str(free_port()))
        result = subprocess.run([part.replace("{port}", env["MASTER_PORT"]) for part in command], env=env,
                                capture_output=True, text=True, timeout=240, cwd=cwd)
        if result.returncode == 0:
            return result
        failures.append(result.stderr[-3000:])
    pytest.fail("\n---\n".join(failures))


def accelerate_launch(tmp_path, mixed_precision, scenarios):
    pytest.importorskip("accelerate")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
               "--main_process_port", "{port}",
               str(ROOT / "tests" / "accelerate_worker.py"), str(tmp_path), ",".join(scenarios)]
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
                        micro_batch=4, cache=False, autocast_dtype=torch.bfloat16)
    loss = ab.step(x.float(), y)
    for rank in range(2):
        result = results[("two_pass", rank)]
        assert result["loss"][0] == pytest.approx(loss, rel=1e-5)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def lightning_run(tmp_path, devices, bn):
    pytest.importorskip("lightning")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, str(ROOT / "tests" / "lightning_worker.py"), str(tmp_path), str(devices), bn]
    result = launched(command, env, cwd=tmp_path)
    assert "train_loss=" in result.stderr + result.stdout  # Lightning's progress bar shows the logged loss
    return [torch.load(tmp_path / f"lightning-{bn}-{devices}-{rank}.pt") for rank in range(devices)]


@pytest.mark.parametrize("devices, bn, micro_batch", [(2, "two_pass", 4), (2, "exact", 16), (1, "two_pass", 4)])
def test_lightning_trains_as_autobatchs_own_path(tmp_path, devices, bn, micro_batch):
    """Lightning's Trainer, manual optimization, ab.step in training_step; on 2 CPU processes with
    AutoBatchDDPStrategy (Lightning launches them, gloo): the same step as one process with the
    whole batch, which autobatch's own DDP path equals (tests/test_distributed.py)."""
    reference = single_process(resnet(), slice(0, 16), micro_batch=micro_batch, image=True)
    for result in lightning_run(tmp_path, devices, bn):
        assert result["world"] == devices and len(result["loss"]) == 1  # max_steps=1 counted autobatch's step
        assert result["logged"] == pytest.approx(result["loss"][0], rel=1e-6)  # self.log is float32
        assert_same(result, reference)
        assert not any("autobatch" in key or "module." in key for key in result["keys"])
