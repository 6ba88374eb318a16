import pytest
import torch
from torch import nn

from autobatch.planning.measure import peak_bytes, tensor_bytes, warm_optimizer_state
from tests.common import compiled

MIB = 2**20


def test_peak_counts_live_tensors_and_their_release():
    model = nn.Linear(4, 4, bias=False)  # 64 bytes
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    kept = []

    def work():
        a = torch.empty(MIB, dtype=torch.uint8)
        b = torch.empty(2 * MIB, dtype=torch.uint8)
        del a
        c = torch.empty(MIB // 2, dtype=torch.uint8)
        view = b[10:]  # a view is no new memory
        kept.append((b, c, view))

    peak = peak_bytes(work, torch.device("cpu"), model, optimizer)
    assert peak == 64 + 3 * MIB


def test_the_data_the_work_reads_and_its_views_are_not_new_memory():
    # A batch sliced from a whole dataset on the host: its storage is the dataset's, there already.
    model = nn.Linear(4, 4, bias=False)  # 64 bytes
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dataset = {"x": torch.zeros(8 * MIB, dtype=torch.uint8), "ids": torch.arange(8)}
    batch = {"x": dataset["x"][:MIB], "ids": dataset["ids"][:2], "name": "shard-0"}
    kept = []

    def work():
        part = batch["x"][: MIB // 2]  # a micro-batch of the batch
        kept.append((part, part.clone()))  # the copy is new memory

    assert peak_bytes(work, torch.device("cpu"), model, optimizer, batch) == 64 + MIB // 2
    kept.clear()
    assert peak_bytes(work, torch.device("cpu"), model, optimizer) == 64 + 8 * MIB + MIB // 2  # data unnamed


def test_peak_of_a_training_step_grows_linearly_with_the_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 2))
    optimizer = torch.optim.Adam(model.parameters())

    def step(n):
        def work():
            loss = model(torch.randn(n, 3, 16, 16)).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return work

    step(1)()  # Adam's state exists from here on
    peaks = [peak_bytes(step(n), torch.device("cpu"), model, optimizer) for n in (2, 4, 6, 8)]
    steps = [b - a for a, b in zip(peaks, peaks[1:])]
    assert steps[0] > 0 and steps == [steps[0]] * 3
    assert peaks[0] > tensor_bytes(model, optimizer)


def test_tensor_bytes_counts_parameters_buffers_grads_and_optimizer_state():
    model = nn.Sequential(nn.Linear(10, 10), nn.BatchNorm1d(10))
    optimizer = torch.optim.Adam(model.parameters())
    before = tensor_bytes(model, optimizer)
    params = sum(p.numel() * 4 for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert before == params + buffers
    model(torch.randn(4, 10)).sum().backward()
    optimizer.step()
    assert tensor_bytes(model, optimizer) == before + params + 2 * params + 4 * 4  # grads, Adam moments, steps


def test_warm_optimizer_state_creates_what_the_first_step_would():
    model = nn.Linear(3, 3)
    optimizer = torch.optim.Adam(model.parameters())
    warm_optimizer_state(optimizer)
    assert set(optimizer.state[model.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    assert all(p.grad is None for p in model.parameters())


def test_peaks_agree_with_pytorchs_memtracker():
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 2))
    optimizer = torch.optim.Adam(model.parameters())
    warm_optimizer_state(optimizer)

    def step(n):
        def work():
            model(torch.randn(n, 3, 16, 16)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return work

    for n in (2, 5):
        tracker = mem_tracker.MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            step(n)()
        reference = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
        assert peak_bytes(step(n), torch.device("cpu"), model, optimizer) == reference


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="torch.compiler.set_stance needs torch 2.6")
def test_a_compiled_model_is_measured_eagerly_and_stays_compiled():
    # Dynamo skips a frame called under a dispatch mode and went on skipping it afterwards
    # (pytorch/pytorch#190286): one measured step would have left the model uncompiled for good.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    graphs = []
    fast = compiled(model, graphs)
    x = torch.randn(8, 16)

    def step(module):
        module(x).square().sum().backward()
        model.zero_grad(set_to_none=True)

    eager_peak = peak_bytes(lambda: step(model), torch.device("cpu"), model, optimizer)
    assert peak_bytes(lambda: step(fast), torch.device("cpu"), model, optimizer) == eager_peak
    assert not graphs
    step(fast)
    assert graphs


def test_no_python_of_ours_runs_as_a_tracked_tensor_dies():
    """Python swallows an exception raised inside a weakref callback or finalizer: a Ctrl-C that landed in
    the tracker's release callback was lost (found by the Ctrl-C sweep of an exact step, after other tests
    left garbage to collect). Releases are now noted by a C method; the count stays exact."""
    import sys

    from autobatch.planning import measure

    ran = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == measure.__file__:
            ran.append(frame.f_code.co_name)

    with measure._LiveBytes([]) as tracker:
        kept, dropped = torch.ones(1000), torch.ones(3000)
        assert tracker.live == 16_000
        sys.setprofile(profile)
        try:
            del dropped
        finally:
            sys.setprofile(None)
        assert ran == [] and tracker.live == 4_000 and tracker.peak == 16_000
        del kept
        assert tracker.live == 0
