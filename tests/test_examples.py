"""The examples run as a user runs them (the detection example needs torchvision, and skips without it)."""
import os
import pathlib
import subprocess
import sys

import pytest

from tests.integrations.launch import launched

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.slow


def run(*command, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, *command], cwd=EXAMPLES, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_classifier_example_learns():
    output = run("train_classifier.py")
    assert "test accuracy" in output and float(output.rsplit("test accuracy", 1)[1]) > 0.9


def test_the_language_model_example_learns_with_a_token_loss():
    output = run("train_language_model.py")
    losses = [float(line.split("token loss ")[1].split()[0]) for line in output.splitlines() if "mean token loss" in line]
    assert losses[-1] < 0.5 * losses[0] and "splits" in output


def torchrun(script):
    return launched([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port={port}",
                     str(EXAMPLES / script)], dict(os.environ, OMP_NUM_THREADS="1"), cwd=EXAMPLES).stdout


def test_the_ddp_example_keeps_the_ranks_alike():
    output = torchrun("train_ddp.py")
    assert "running statistics identical on every rank: True" in output and "splits" in output


def test_the_fsdp_example_runs_on_two_processes():
    output = torchrun("train_fsdp.py")
    assert "rank 0 holds a shard" in output and "splits" in output


def test_the_detection_example_learns():
    pytest.importorskip("torchvision")
    output = run("train_detection.py", timeout=300)
    losses = [float(line.split("loss ")[1].split()[0]) for line in output.splitlines() if line.startswith("step ")]
    assert losses[-1] < losses[0] and "splits" in output


@pytest.mark.parametrize("script", ["train_lightning.py", "train_lightning_manual.py"])
def test_the_lightning_examples_learn(script):
    pytest.importorskip("lightning")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, script], cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    import re

    losses = [float(value) for value in re.findall(r"train_loss[=:] ?([0-9.]+)", result.stdout + result.stderr)]
    # 4 classes: a model that learned nothing stays near ln 4 = 1.39.
    assert losses and losses[-1] < 1.0 and "max_epochs=2` reached" in result.stdout + result.stderr


def test_the_hugging_face_trainer_example_learns():
    pytest.importorskip("transformers")
    output = run("train_hf_trainer.py")
    first, last = (float(v) for v in output.split("logged loss: first ")[1].split(", last "))
    assert last < 0.9 * first and "splits" in output
