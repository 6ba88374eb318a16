import logging

import pytest

from autobatch.__main__ import _budget, _shape, main


def test_plan_command_prints_the_plan(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="autobatch"):
        assert main(["plan", "--model", "tests.models:ResidualNet", "--input-shape", "3x12x12",
                     "--target-batch", "16", "--budget", "1MiB", "--optimizer", "sgd"]) == 0
    out = capsys.readouterr().out
    assert "source          measured" in out and "splits          [" in out
    assert "splits          [16]" not in out
    assert "autobatch trial, micro-batch of 2" in caplog.text  # progress while it measures


def test_demo_command(capsys, tmp_path):
    assert main(["demo", "--epochs", "1", "--train-size", "32", "--micro-batch", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "validation IoU" in out and "micro-batches [4, 4, 4, 4]" in out
    assert (tmp_path / "demo-prediction.png").exists()


def test_arguments():
    assert _budget("6GiB") == "6GiB" and _budget("0.5") == 0.5 and _budget("none") is None
    assert _budget("4000000") == 4000000
    assert _shape("3x224x224") == (3, 224, 224)
    with pytest.raises(SystemExit):
        _shape("3 by 4")
    with pytest.raises(SystemExit):
        main(["plan", "--model", "nocolon", "--input-shape", "3", "--target-batch", "2"])
