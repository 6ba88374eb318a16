"""PyTorch Lightning's Trainer with autobatch in training_step, one device and 2 CPU processes."""
import os
import re
import sys

import pytest
import torch

from tests.distributed_worker import resnet
from tests.integrations.launch import ROOT, WORKERS, launched
from tests.test_distributed import assert_same, single_process

pytestmark = pytest.mark.slow


def lightning_run(tmp_path, devices, bn):
    pytest.importorskip("lightning")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, str(WORKERS / "lightning_worker.py"), str(tmp_path), str(devices), bn]
    result = launched(command, env, cwd=tmp_path)
    # Lightning's progress bar shows the logged loss: tqdm's as "train_loss=", rich's (where rich is installed,
    # as transformers' dependencies bring it) as "train_loss:".
    assert re.search(r"train_loss[=:] ?[0-9]", result.stderr + result.stdout)
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


def test_lightnings_fsdp_strategy_is_refused_with_what_works():
    L = pytest.importorskip("lightning")
    from lightning.pytorch.strategies import FSDPStrategy

    import autobatch.integrations.lightning

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 2)

    module = Module()
    # Lightning's FSDPStrategy needs an accelerator to run: the refusal reads only its type.
    trainer = type("Trainer", (), {"strategy": FSDPStrategy.__new__(FSDPStrategy)})()
    module.__dict__["_trainer"] = trainer
    with pytest.raises(TypeError, match="fully_shard .* autobatch.wrap"):
        autobatch.integrations.lightning.wrap(module, target_batch=8, loss_fn=torch.nn.MSELoss())
