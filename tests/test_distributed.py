"""Two gloo processes against one process with the whole batch, in float64."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import autobatch
from tests.distributed_worker import ce, data, mlp, resnet

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
              pytest.mark.slow]
ROOT = pathlib.Path(__file__).resolve().parents[1]


def launch(tmp_path, scenarios, deadline=90):
    """Runs the scenarios on 2 ranks; a rank still running at the deadline is a hang, and fails the test."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "-m", "tests.distributed_worker", str(rank), ",".join(scenarios),
                                 str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
               for rank in range(2)]
    outputs = []
    for worker in workers:
        try:
            outputs.append(worker.communicate(timeout=deadline)[0])
        except subprocess.TimeoutExpired:
            for w in workers:
                w.kill()
            pytest.fail(f"a rank hung past {deadline} s")
    return {(name, rank): torch.load(tmp_path / f"{name}-{rank}.pt", weights_only=False)
            for name in scenarios for rank in range(2) if (tmp_path / f"{name}-{rank}.pt").exists()}, outputs


@pytest.fixture(scope="module")
def good_runs(tmp_path_factory):
    scenarios = ["no_bn_exact", "uneven", "padding", "bn_two_pass", "sync_bn", "chunked_phase_one", "micro_bn",
                 "out_of_memory", "one_sample_on_rank_one", "checkpointed", "out_of_memory_before_the_last",
                 "phase_one_in_channels_last", "channels_last_fails_on_rank_one", "compiled_ddp",
                 "ddp_of_compiled", "stochastic_depth", "out_of_memory_empty_message", "out_of_memory_cublas",
                 "interrupted_in_loss", "interrupted_after_update", "out_of_memory_after_update", "exact",
                 "exact_uneven", "counted", "counted_uneven", "variable_sizes", "projected", "precise_uneven",
                 "precise_steps", "precise_refused_on_rank_one", "precise_refused_in_phase_one_on_rank_one",
                 "precise_out_of_memory", "precise_ddp_options"]
    results, outputs = launch(tmp_path_factory.mktemp("ddp"), scenarios)
    for key, result in results.items():
        assert "ok" in result, (key, result.get("trace"))
    assert len(results) == 2 * len(scenarios), outputs
    return results


def single_process(model, rows, micro_batch, image=False, phase1_chunks=1, **options):
    """One process's step on ``rows``; bn="two_pass" (the projected backward) unless given: with ``micro_batch``
    the whole of ``rows``, the unsplit step itself, which the default (precise) gives on every rank."""
    options.setdefault("bn", "two_pass")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = data(image=image)
    ab = autobatch.wrap(model, optimizer, len(range(16)[rows]), ce, micro_batch=micro_batch, cache=False, **options)
    if phase1_chunks > 1:
        ab.plan = ab.plan.replace(phase1_chunks=phase1_chunks)
    loss = ab.step(x[rows], y[rows])
    return {"state": model.state_dict(), "loss": [loss]}


def assert_same(result, reference, keys=None):
    for key, value in reference["state"].items():
        if keys is None or any(k in key for k in keys):
            torch.testing.assert_close(result["state"][key], value, rtol=1e-10, atol=1e-12, msg=key)
    assert result["loss"][0] == pytest.approx(reference["loss"][0], rel=1e-10)


@pytest.mark.parametrize("scenario, rows", [("no_bn_exact", slice(0, 16)), ("uneven", slice(0, 13)),
                                            ("padding", slice(0, 9))])
def test_no_bn_ranks_equal_one_process_with_the_whole_batch(good_runs, scenario, rows):
    reference = single_process(mlp(), rows, micro_batch=16)  # the full batch itself
    for rank in range(2):
        assert_same(good_runs[(scenario, rank)]["ok"], reference)


def whole_batch(rows=slice(0, 16), steps=1):
    """The unsplit step of the image model on ``rows`` of the shared data, ``steps`` times (float64)."""
    model = resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = data(image=True)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ce(model(x[rows]), y[rows])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"state": model.state_dict(), "loss": losses}


@pytest.mark.parametrize("scenario", ["bn_two_pass", "sync_bn", "checkpointed", "channels_last_fails_on_rank_one",
                                      "compiled_ddp", "ddp_of_compiled", "precise_out_of_memory"])
def test_the_default_over_two_ranks_is_one_process_with_the_whole_batch(good_runs, scenario):
    """#38: the default's precise backward under DDP: each BatchNorm's two backward sums over both ranks, every
    gradient averaged as DDP averages it; equal to one process's unsplit step (float64), running statistics
    included."""
    reference = whole_batch()
    for rank in range(2):
        result = good_runs[(scenario, rank)]["ok"]
        assert_same(result, reference)
        assert result["gradient"] == "precise: the full batch's exact gradient"


@pytest.mark.parametrize("scenario, rows, steps", [("precise_uneven", slice(0, 13), 1),
                                                   ("precise_steps", slice(0, 16), 3),
                                                   ("precise_ddp_options", slice(0, 16), 2)])
def test_the_default_over_uneven_ranks_and_several_steps_is_the_whole_batch(good_runs, scenario, rows, steps):
    reference = whole_batch(rows, steps)
    for rank in range(2):
        result = good_runs[(scenario, rank)]["ok"]
        for key, value in reference["state"].items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-10, atol=1e-12, msg=key)
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-10)


@pytest.mark.parametrize("scenario", ["precise_refused_on_rank_one", "precise_refused_in_phase_one_on_rank_one"])
def test_precise_refused_on_one_rank_is_the_projected_backward_on_both(good_runs, scenario):
    reference = single_process(resnet(), slice(0, 16), micro_batch=4, image=True)
    for rank in range(2):
        result = good_runs[(scenario, rank)]["ok"]
        assert_same(result, reference)
        assert "refused in" in result["gradient"] and "on rank 1" in result["gradient"]


@pytest.mark.parametrize("scenario", ["projected", "phase_one_in_channels_last"])
def test_two_pass_statistics_over_both_ranks(good_runs, scenario):
    # The same micro-batches of 4 in one process: the same full-batch statistics, so the same step.
    reference = single_process(resnet(), slice(0, 16), micro_batch=4, image=True)
    full = resnet()
    x, y = data(image=True)
    full_loss = ce(full(x), y).item()
    for rank in range(2):
        result = good_runs[(scenario, rank)]["ok"]
        assert_same(result, reference)
        assert result["loss"][0] == pytest.approx(full_loss, rel=1e-10)  # the full-batch forward
        for key, value in full.state_dict().items():  # running statistics of one full-batch step
            if "running" in key or "num_batches" in key:
                torch.testing.assert_close(result["state"][key.replace("bn.", "bn.")], value, rtol=1e-10,
                                           atol=1e-12, msg=key)


def test_ranks_choose_phase_one_memory_format_together(good_runs):
    formats = {scenario: [good_runs[(scenario, rank)]["ok"]["phase1_memory_format"] for rank in range(2)]
               for scenario in ("bn_two_pass", "phase_one_in_channels_last", "channels_last_fails_on_rank_one")}
    assert formats["bn_two_pass"][0] == formats["bn_two_pass"][1] != "None"  # measured, the same on both
    assert formats["phase_one_in_channels_last"] == ["torch.channels_last"] * 2
    assert formats["channels_last_fails_on_rank_one"] == ["torch.preserve_format"] * 2


def test_out_of_memory_before_the_last_micro_batch_on_one_rank_makes_both_redo_the_batch(good_runs):
    # Rank 0's last forward armed its DDP reducer; rank 1 never got there. Both redo the batch in step, in
    # micro-batches of 3: the full batch's loss and running statistics, counted once, on both.
    full = resnet()
    x, y = data(image=True)
    full_loss = ce(full(x), y).item()
    results = [good_runs[("out_of_memory_before_the_last", rank)]["ok"] for rank in range(2)]
    for result in results:
        assert "out of memory at micro_batch=4: capacity now 3" in result["plan"]
        assert result["loss"][0] == pytest.approx(full_loss, rel=1e-10)
        for key, value in full.state_dict().items():
            if "running" in key or "num_batches" in key:
                torch.testing.assert_close(result["state"][key], value, rtol=1e-10, atol=1e-12, msg=key)
    for key, value in results[0]["state"].items():
        assert torch.equal(results[1]["state"][key], value), key
    for key, value in results[0]["second"].items():  # the next step keeps the ranks together
        assert torch.equal(results[1]["second"][key], value), key


def test_a_rank_with_one_sample_takes_part_at_weight_zero(good_runs):
    full = resnet()
    x, y = data(image=True)
    full_loss = ce(full(x[:9]), y[:9]).item()  # one full-batch forward in training mode: its running statistics
    results = [good_runs[("one_sample_on_rank_one", rank)]["ok"] for rank in range(2)]
    for result in results:
        assert result["loss"][0] == pytest.approx(full_loss, rel=1e-10)
        for key, value in full.state_dict().items():
            if "running" in key or "num_batches" in key:
                torch.testing.assert_close(result["state"][key], value, rtol=1e-10, atol=1e-12, msg=key)
    for key, value in results[0]["state"].items():  # the replicas stay equal
        assert torch.equal(results[1]["state"][key], value), key


def test_chunked_phase_one_pools_statistics_over_both_ranks(good_runs):
    # Two ranks with phase 1 in 2 chunks each are the same 4 chunks as one process in 4 chunks.
    reference = single_process(resnet(), slice(0, 16), micro_batch=4, image=True, phase1_chunks=4)
    for rank in range(2):
        assert_same(good_runs[("chunked_phase_one", rank)]["ok"], reference)


def test_micro_mode_pools_running_statistics_over_both_ranks(good_runs):
    reference = single_process(resnet(), slice(0, 16), micro_batch=4, image=True, bn="micro")
    for rank in range(2):
        assert_same(good_runs[("micro_bn", rank)]["ok"], reference)


@pytest.mark.parametrize("scenario", ["out_of_memory", "out_of_memory_empty_message", "out_of_memory_cublas"])
def test_out_of_memory_on_one_rank_makes_both_redo_the_batch(good_runs, scenario):
    reference = single_process(mlp(), slice(0, 16), micro_batch=16)
    for rank in range(2):
        result = good_runs[(scenario, rank)]["ok"]
        assert_same(result, reference)
        assert "out of memory at micro_batch=8" in result["plan"]


def test_failures_raise_on_every_rank(tmp_path):
    results, outputs = launch(tmp_path, ["too_large_on_rank_one", "targets_disagree", "loss_fails_on_rank_one"])
    assert results[("too_large_on_rank_one", 1)]["error"] == "ValueError"
    assert results[("too_large_on_rank_one", 0)]["error"] == "RankFailure"
    assert "rank 1 rejected its batch" in results[("too_large_on_rank_one", 0)]["message"]
    for rank in range(2):
        assert "disagree on target_batch" in results[("targets_disagree", rank)]["message"]
    assert results[("loss_fails_on_rank_one", 1)]["error"] == "KeyError"
    assert results[("loss_fails_on_rank_one", 0)]["error"] == "RankFailure"
    assert "rank 1 failed in this step" in results[("loss_fails_on_rank_one", 0)]["message"]
    assert all(torch.load(tmp_path / f"unchanged-{rank}.pt") for rank in range(2))


@pytest.mark.parametrize("scenario", ["interrupted_in_loss", "interrupted_after_update"])
def test_an_interrupt_on_one_rank_leaves_every_rank_as_before_and_training_goes_on(good_runs, scenario):
    reference = whole_batch()
    results = [good_runs[(scenario, rank)]["ok"] for rank in range(2)]
    assert [result["raised"] for result in results] == ["RankFailure", "KeyboardInterrupt"]
    for result in results:
        assert result["unchanged"]
        assert_same(result, reference)


def test_out_of_memory_after_one_ranks_update_takes_the_update_again_on_both(good_runs):
    reference = single_process(mlp(), slice(0, 16), micro_batch=16)
    for rank in range(2):
        result = good_runs[("out_of_memory_after_update", rank)]["ok"]
        assert_same(result, reference)
        assert "out of memory" not in result["plan"]  # the micro-batch stays: a smaller one would not help
        assert result["forwards"] == 1  # one micro-batch of 8, run once
    assert good_runs[("out_of_memory_after_update", 1)]["ok"]["updates"] == 1


@pytest.mark.parametrize("scenario, rows", [("exact", slice(0, 16)), ("exact_uneven", slice(0, 13))])
def test_exact_over_two_ranks_is_one_process_with_the_whole_batch(good_runs, scenario, rows):
    """BatchNorm's statistics and the sums of its backward over both ranks, also in the block that
    checkpointing recomputes: the global batch's step, running statistics and counters included."""
    reference = single_process(resnet(), rows, micro_batch=len(range(16)[rows]), image=True)
    for rank in range(2):
        result = good_runs[(scenario, rank)]["ok"]
        assert "blocks.0" in result["plan"]
        assert_same(result, reference)


def test_a_dead_rank_ends_with_a_clear_error(tmp_path):
    results, outputs = launch(tmp_path, ["rank_one_dies"], deadline=60)
    assert ("rank_one_dies", 1) not in results
    result = results[("rank_one_dies", 0)]
    assert result["error"] == "RankFailure", result
    assert "another rank probably died" in result["message"]


def test_stochastic_depth_trains_on_two_ranks(good_runs):
    first, second = good_runs[("stochastic_depth", 0)]["ok"], good_runs[("stochastic_depth", 1)]["ok"]
    assert first["loss"] == second["loss"] and len(first["loss"]) == 10
    assert all(loss == loss and loss < 10 for loss in first["loss"]), first["loss"]
    for key, value in first["state"].items():
        assert torch.equal(value, second["state"][key]), key
        assert torch.isfinite(value.double()).all(), key


@pytest.mark.parametrize("scenario, rows", [("counted", slice(0, 8)), ("counted_uneven", [0, 1, 2, 3, 7])])
def test_count_weighted_losses_over_ranks_with_different_counts_equal_the_whole_batch(good_runs, scenario, rows):
    # Rank 0's short sequences hold far fewer tokens than rank 1's: each token weighs the same on both.
    from tests.common import TinyLanguageModel, padded_sequences, token_loss_mean
    from tests.distributed_worker import COUNTED_LENGTHS
    torch.manual_seed(0)
    model = TinyLanguageModel().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for step in range(2):
        batch = {key: value[rows] for key, value in padded_sequences(COUNTED_LENGTHS, seed=step).items()}
        optimizer.zero_grad()
        loss = token_loss_mean(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for rank in range(2):
        result = good_runs[(scenario, rank)]["ok"]
        for key, value in model.state_dict().items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-10, atol=1e-12, msg=key)
        assert result["loss"] == pytest.approx(losses, rel=1e-10)


def test_ranks_with_samples_of_different_sizes_agree_on_the_number_of_micro_batches(good_runs):
    from tests.distributed_worker import variable_data
    results = [good_runs[("variable_sizes", rank)]["ok"] for rank in range(2)]
    assert results[0]["micro_batch"] > results[1]["micro_batch"]  # each rank's own memory model and size
    assert results[0]["forwards"] == results[1]["forwards"] > 1  # as many micro-batches as the larger needs
    # The gradient of the mean loss over both ranks' samples: one process computing each rank's part.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(32, 5)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = [ce(model(x), y) for x, y in (variable_data(0), variable_data(1))]
    (sum(losses) / 2).backward()
    optimizer.step()
    for result in results:
        for key, value in model.state_dict().items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-10, atol=1e-12, msg=key)
        assert result["loss"][0] == pytest.approx(sum(loss.item() for loss in losses) / 2, rel=1e-10)
