import logging
import sys

import pytest
import torch

from autobatch.__main__ import UsageError, _budget, _keywords, _parser, _shape, main


def test_plan_command_prints_the_plan(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="autobatch"):
        assert main(["plan", "--model", "tests.common:ResidualNet", "--input-shape", "3x12x12",
                     "--target-batch", "16", "--budget", "1MiB", "--optimizer", "sgd", "--bn", "two_pass"]) == 0
    out = capsys.readouterr().out
    assert "source          measured" in out and "splits          [" in out
    assert "splits          [16]" not in out
    assert "(the largest micro-batch that runs)" in out and "(the largest micro-batch the budget allows)" in out
    assert "autobatch trial, micro-batch of 2" in caplog.text  # progress while it measures


def test_the_factory_gets_keyword_arguments(capsys):
    assert main(["plan", "--model", "tests.common:ResidualNet", "--model-kwargs", "blocks=1,classes=7",
                 "--input-shape", "3x8x8", "--target-batch", "8", "--optimizer", "sgd"]) == 0
    assert _keywords("classes=7,name=small,rate=0.5") == {"classes": 7, "name": "small", "rate": 0.5}
    with pytest.raises(UsageError, match="--model-kwargs must look like"):
        _keywords("7")


def test_a_failure_is_one_message_and_exit_status_2(capsys):
    # A budget that not even one sample's step fits: the figures, the next thing to try, no traceback.
    assert main(["plan", "--model", "tests.common:ResidualNet", "--input-shape", "3x12x12", "--target-batch", "16",
                 "--budget", "60KiB", "--optimizer", "sgd"]) == 2
    err = capsys.readouterr().err
    assert "not even a micro-batch of one sample fits" in err and "peaked at" in err and "budget of" in err
    assert "Raise memory_budget" in err and "Traceback" not in err
    for arguments, message in ((["--model", "nocolon"], "must look like package.module:factory"),
                               (["--model", "tests.common:Nothing"], "has no attribute 'Nothing'"),
                               (["--model", "tests.common:ResidualNet", "--model-kwargs", "depth=3"],
                                "pass its arguments with --model-kwargs")):
        assert main(["plan", *arguments, "--input-shape", "3x8x8", "--target-batch", "4"]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(MemoryError):
        main(["plan", "--debug", "--model", "tests.common:ResidualNet", "--input-shape", "3x12x12",
              "--target-batch", "16", "--budget", "60KiB", "--optimizer", "sgd"])


def not_a_module():
    return "a string"


@pytest.mark.parametrize("arguments, message", [
    (["--device", "cuda"], "no CUDA device"),
    (["--model", "tests.test_main:not_a_module"], "returned a str, not a torch.nn.Module"),
    (["--plot", "no/such/folder/plan.png"], "the folder no/such/folder does not exist"),
    (["--budget", "1.5"], "a fraction of the device's memory and must lie in (0, 1]"),
    (["--input-shape", "3x0x32"], "--input-shape 3x0x32: every size must be 1 or more"),
    (["--input-shape", "5x8x8"], "--input-shape 5x8x8: the model cannot take one sample of that shape"),
    (["--budget", "1"], "--budget 1 is 1 B, less than any model's step needs"),
    (["--budget", "2KiB"], "--budget 2KiB: the model's parameters and their gradients alone take"),
    (["--target-batch", "0"], "--target-batch 0: the logical batch must be 1 or more"),
])
def test_bad_command_lines_are_one_message_and_exit_status_2_before_any_measurement(arguments, message, capsys,
                                                                                    caplog):
    if "--device" in arguments and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    base = {"--model": "tests.common:ResidualNet", "--input-shape": "3x8x8", "--target-batch": "4",
            "--optimizer": "sgd"}
    base.update(dict(zip(arguments[::2], arguments[1::2])))
    assert main(["plan", *[part for pair in base.items() for part in pair]]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert "autobatch trial" not in caplog.text  # refused before anything was measured


def test_a_budget_too_small_for_batch_norm_of_one_sample_gets_the_planners_message(capsys):
    # A BatchNorm1d without positions cannot be trained on one sample; the trial measures it anyway.
    assert main(["plan", "--model", "tests.common:mlp", "--model-kwargs", "batch_norm=True", "--input-shape", "6",
                 "--target-batch", "8",
                 "--budget", "3KiB", "--optimizer", "sgd"]) == 2
    assert "not even a micro-batch of one sample fits" in capsys.readouterr().err


def test_every_option_has_help():
    parser = _parser()
    commands = next(action for action in parser._actions if action.dest == "command")
    for name, command in commands.choices.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings} has no help text"


def test_the_plan_can_be_drawn(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plan.png"
    assert main(["plan", "--model", "tests.common:ResidualNet", "--input-shape", "3x12x12", "--target-batch", "16",
                 "--budget", "1MiB", "--optimizer", "sgd", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_drawing_without_matplotlib_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plan", "--model", "tests.common:ResidualNet", "--input-shape", "3x8x8", "--target-batch", "4",
                 "--optimizer", "sgd", "--plot", "never.png"]) == 2
    assert 'pip install "torch-autobatch[plot]"' in capsys.readouterr().err


def test_demo_command(capsys, tmp_path):
    assert main(["demo", "--epochs", "1", "--train-size", "32", "--micro-batch", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "validation IoU" in out and "micro-batches [4, 4, 4, 4]" in out
    assert "bn=two_pass: precise: the full batch's exact gradient" in out  # the default, at a given size
    assert (tmp_path / "demo-prediction.png").exists()


def test_arguments():
    assert _budget("6GiB") == 6 * 2**30 and _budget("0.5") == 0.5 and _budget("none") is None
    assert _budget("4000000") == 4000000 and _budget("1.0") == 1.0
    assert _shape("3x224x224") == (3, 224, 224)
    with pytest.raises(UsageError):
        _shape("3 by 4")


def test_importing_autobatch_without_numpy_warns_nothing():
    import subprocess

    code = "import sys; sys.modules['numpy'] = None; import autobatch"
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "NumPy" not in result.stderr


@pytest.mark.parametrize("arguments, message", [
    (["--epochs", "0"], "--epochs 0: the passes over the training images must be 1 or more"),
    (["--epochs", "-1"], "--epochs -1: the passes over the training images must be 1 or more"),
    (["--micro-batch", "abc"], "--micro-batch abc: give a number of samples (1 or more), or auto"),
    (["--train-size", "0"], "--train-size 0: the number of training images must be 1 or more"),
    (["--budget", "0"], "--budget 0 is 0 B, less than any model's step needs"),
    (["--budget", "-5MiB"], "--budget -5MiB: not a size"),
    (["--budget", "lots"], "--budget lots: not a size"),
])
def test_bad_demo_command_lines_name_the_flag_and_exit_2(arguments, message, capsys):
    assert main(["demo", *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_retune_is_a_hidden_alias_of_refresh_cache_that_warns(capsys, caplog):
    from autobatch.__main__ import _parser

    assert "--retune" not in _parser().format_help() and "--retune" not in _subcommand_help("plan")
    args = _parser().parse_args(["plan", "--model", "m:f", "--input-shape", "3x8x8", "--target-batch", "4",
                                 "--retune"])
    assert args.refresh_cache and "--retune is now --refresh-cache" in caplog.text


def _subcommand_help(name):
    from autobatch.__main__ import _parser

    parser = _parser()
    action = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return action.choices[name].format_help()


def test_the_plan_states_the_undo_copies_and_names_them_where_they_keep_it_from_fitting(capsys):
    """#39: the update's undo copies doubled the update's memory, unsaid; a budget they alone broke gave no way
    out, and the command line could not turn them off."""
    model = ["--model", "torch.nn:Linear", "--model-kwargs", "in_features=512,out_features=512", "--input-shape",
             "512", "--target-batch", "16", "--optimizer", "adamw"]
    assert main(["plan", *model, "--budget", "12MiB"]) == 0
    assert "undo copies     3.01 MiB, to undo a failed optimizer update" in capsys.readouterr().out
    assert main(["plan", *model, "--budget", "8MiB"]) == 2
    err = capsys.readouterr().err
    assert "3.01 MiB the update's undo copies, without which one sample would fit" in err
    assert "update_copies='none'" in err and "can then not be undone" in err
    assert main(["plan", *model, "--budget", "8MiB", "--update-copies", "none"]) == 0
    assert "undo copies" not in capsys.readouterr().out
