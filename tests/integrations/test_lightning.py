"""PyTorch Lightning's Trainer with autobatch: in training_step (manual optimization), one device and 2 CPU
processes; and AutoBatchCallback under automatic optimization."""
import copy
import os
import re
import sys

import pytest
import torch

import autobatch
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


@pytest.mark.parametrize("devices", [2, 1])
def test_the_callback_on_two_processes_trains_as_autobatchs_own_path(tmp_path, devices):
    """AutoBatchCallback, automatic optimization, with AutoBatchDDPStrategy on 2 CPU processes: the same
    step as one process with the whole batch in micro-batches of 4 (tests/test_distributed.py)."""
    # The default's precise backward, on one process or over both: the whole batch's step.
    reference = single_process(resnet(), slice(0, 16), micro_batch=4, image=True, bn="auto")
    for result in lightning_run(tmp_path, devices, "automatic"):
        assert result["world"] == devices and len(result["loss"]) == 1
        # training_step returns the logical batch's loss over every process; self.log keeps each process's own
        # (its samples' mean, as without autobatch), the whole batch's where there is one process.
        assert result["loss"][0] == pytest.approx(reference["loss"][0], rel=1e-6)
        assert (result["logged"] == pytest.approx(reference["loss"][0], rel=1e-6)) is (devices == 1)
        assert_same({**result, "loss": [reference["loss"][0]]}, reference)
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


# -- automatic optimization: AutoBatchCallback, the LightningModule untouched ----------------------------

def _fit(module, x, y, batch_size, callbacks=(), **trainer_options):
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, callbacks=list(callbacks),
                        **trainer_options)
    trainer.fit(module, loader)
    return trainer


def _classifier(net, lr=0.5):
    L = pytest.importorskip("lightning")

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net
            self.seen = []

        def forward(self, inputs):
            return self.net(inputs)

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            if torch.is_grad_enabled():  # not two_pass's phase 1
                self.seen.append(len(inputs))
            loss = torch.nn.functional.cross_entropy(self(inputs), targets)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)}

    return Classifier()


@pytest.mark.parametrize("options", [{}, {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05}],
                         ids=["plain", "accumulated and clipped"])
def test_the_callback_trains_as_lightning_on_the_whole_batch(options):
    """float64, no BatchNorm: 3 optimizer steps (with a scheduler) equal Lightning's on the whole batch."""
    from autobatch.integrations.lightning import AutoBatchCallback
    from tests.common import mlp

    torch.manual_seed(0)
    net = mlp().double()
    x, y = torch.randn(16 * 6, 6, dtype=torch.float64), torch.randint(0, 3, (16 * 6,))
    stock, split = _classifier(copy.deepcopy(net)), _classifier(copy.deepcopy(net))
    stock_trainer = _fit(stock, x, y, 16, max_steps=3, **options)
    callback = AutoBatchCallback(micro_batch=5, cache=False)
    trainer = _fit(split, x, y, 16, callbacks=[callback], max_steps=3, **options)
    assert trainer.global_step == stock_trainer.global_step == 3
    assert max(split.seen) == 4 and max(stock.seen) == 16  # micro-batches of at most 5: 4, 4, 4, 4
    for p, q in zip(split.net.parameters(), stock.net.parameters()):
        assert (p - q).norm() <= 1e-10 * q.norm()
    assert float(trainer.callback_metrics["train_loss"]) == pytest.approx(
        float(stock_trainer.callback_metrics["train_loss"]), rel=1e-10)
    assert "training_step" not in vars(split)  # restored when fitting ended
    assert list(split.state_dict()) == list(stock.state_dict())


def test_the_callback_gives_batchnorm_the_whole_batch():
    """A BatchNorm model with the exact two_pass: the whole batch's step, running statistics counted once."""
    from autobatch.integrations.lightning import AutoBatchCallback
    from tests.common import ResidualNet, data

    torch.manual_seed(0)
    net = ResidualNet(blocks=1).double()
    x, y = data(16)
    stock, split = _classifier(copy.deepcopy(net)), _classifier(copy.deepcopy(net))
    _fit(stock, x, y, 16, max_steps=1)
    _fit(split, x, y, 16, callbacks=[AutoBatchCallback(micro_batch=4, bn=autobatch.TwoPass(precise=True),
                                                       cache=False)], max_steps=1)
    assert max(split.seen) == 4
    for (name, value), other in zip(split.net.state_dict().items(), stock.net.state_dict().values()):
        torch.testing.assert_close(value, other, rtol=1e-10, atol=1e-12, msg=name)
    assert int(split.net.bn.num_batches_tracked) == 1


def test_the_callback_under_bf16_autocast_trains_close_to_lightning():
    from autobatch.integrations.lightning import AutoBatchCallback
    from tests.common import mlp

    torch.manual_seed(0)
    net = mlp()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    stock, split = _classifier(copy.deepcopy(net)), _classifier(copy.deepcopy(net))
    _fit(stock, x, y, 16, max_steps=2, precision="bf16-mixed")
    _fit(split, x, y, 16, callbacks=[AutoBatchCallback(micro_batch=8, cache=False)], max_steps=2,
         precision="bf16-mixed")
    for p, q in zip(split.net.parameters(), stock.net.parameters()):
        assert torch.isfinite(p).all() and (p - q).norm() <= 2e-2 * q.norm()


def test_the_callback_refuses_manual_optimization_and_lightnings_own_ddp():
    L = pytest.importorskip("lightning")
    from lightning.pytorch.strategies import DDPStrategy

    from autobatch.integrations.lightning import AutoBatchCallback

    module = _classifier(torch.nn.Linear(6, 3))
    module.automatic_optimization = False
    with pytest.raises(ValueError, match="automatic optimization"):
        AutoBatchCallback().on_fit_start(type("T", (), {"strategy": None})(), module)
    module.automatic_optimization = True
    trainer = type("T", (), {"strategy": DDPStrategy.__new__(DDPStrategy)})()
    with pytest.raises(ValueError, match="AutoBatchDDPStrategy"):
        AutoBatchCallback().on_fit_start(trainer, module)
    assert L is not None
