"""fully_shard (FSDP2) on two gloo processes against one process with the whole batch, in float64."""
import pytest
import torch
import torch.distributed as dist

from tests.distributed_worker import mlp, resnet
from tests.test_distributed import launch

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
              pytest.mark.slow]
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no fully_shard (FSDP2)", allow_module_level=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    scenarios = ["fsdp_two_pass", "fsdp_micro", "fsdp_exact", "fsdp_uneven", "fsdp_out_of_memory", "fsdp_default"]
    results, outputs = launch(tmp_path_factory.mktemp("fsdp"), scenarios)
    for key, result in results.items():
        assert "ok" in result, (key, result.get("trace"))
    assert len(results) == 2 * len(scenarios), outputs
    return results


def one_process(model, rows=slice(0, 16), micro_batch=16, image=True, **options):
    """One process, two SGD momentum steps: with micro_batch=16 the whole batch itself."""
    import autobatch
    from tests.distributed_worker import data
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ab = autobatch.wrap(model, optimizer, len(range(16)[rows]), torch.nn.CrossEntropyLoss(), micro_batch=micro_batch,
                        **options)
    x, y = data(image=image)
    losses = [ab.step(x[rows], y[rows]) for _ in range(2)]
    return {"state": model.state_dict(), "loss": losses}


def assert_same(result, reference):
    assert result["state"].keys() == reference["state"].keys()  # the plain model's keys
    for key, value in reference["state"].items():
        torch.testing.assert_close(result["state"][key], value, rtol=1e-10, atol=1e-12, msg=key)
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-10)


@pytest.mark.parametrize("scenario, reference", [
    ("fsdp_two_pass", lambda: one_process(resnet(), micro_batch=4, bn="two_pass")),  # two_pass, the same micro-batches
    ("fsdp_default", lambda: one_process(resnet(), micro_batch=4, bn="two_pass")),  # the projected backward, said
    ("fsdp_exact", lambda: one_process(resnet())),  # the whole batch itself
    ("fsdp_uneven", lambda: one_process(resnet(), slice(0, 13))),  # 8 and 5 samples, exact: the whole 13
    ("fsdp_out_of_memory", lambda: one_process(mlp(), image=False)),  # redone in micro-batches of 3
])
def test_sharded_ranks_equal_one_process(runs, scenario, reference):
    # Loss, parameters after two SGD momentum steps, running statistics and num_batches_tracked.
    expected = reference()
    for rank in range(2):
        assert_same(runs[(scenario, rank)]["ok"], expected)


def test_micro_pools_running_statistics_over_sharded_ranks(runs):
    # bn="micro": each micro-batch its own statistics; both ranks end alike, and the running statistics
    # are the pooled ones of all 16 samples (compared with DDP's path in tests/test_distributed.py).
    states = [runs[("fsdp_micro", rank)]["ok"]["state"] for rank in range(2)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_out_of_memory_on_one_sharded_rank_is_recovered_on_both(runs):
    for rank in range(2):
        assert "out of memory" in runs[("fsdp_out_of_memory", rank)]["ok"]["plan"]


def test_the_older_fsdp_class_is_refused_with_the_way_to_fully_shard():
    # FullyShardedDataParallel itself needs an accelerator to be made: an instance of the class stands in.
    from torch.distributed.fsdp import FullyShardedDataParallel

    import autobatch
    legacy = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(legacy)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), legacy)
    with pytest.raises(TypeError, match="fully_shard"):
        autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, torch.nn.MSELoss())


def test_gradients_are_reduced_once_per_logical_batch(runs):
    # Two micro-batches per rank and step, two steps: one reduce-scatter per sharded module and step.
    for rank in range(2):
        result = runs[("fsdp_two_pass", rank)]["ok"]
        assert result["reduce_scatters"] == 2 * result["per_step"], result
