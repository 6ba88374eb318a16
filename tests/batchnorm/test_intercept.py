"""Routing of training-mode F.batch_norm calls: per thread, by owner where a thread has no handler,
and PyTorch's own function for everything else; concurrent training in threads is independent."""
import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autobatch
from autobatch.batchnorm.intercept import intercept_batch_norm
from tests.common import ResidualNet, assert_same_state, interrupt_at, model_state

ce = nn.CrossEntropyLoss()


def in_thread(work):
    result = []
    thread = threading.Thread(target=lambda: result.append(work()))
    thread.start()
    thread.join()
    return result[0]


def test_intercept_restores_batch_norm_even_on_error():
    original = F.batch_norm
    with pytest.raises(KeyError):
        with intercept_batch_norm(lambda call: call.input):
            assert F.batch_norm is not original
            raise KeyError
    assert F.batch_norm is original


def test_eval_mode_calls_pass_through():
    bn = nn.BatchNorm2d(3).eval()
    seen = []
    with intercept_batch_norm(seen.append):
        bn(torch.randn(2, 3, 4, 4))
    assert seen == []


def test_the_innermost_handler_of_the_thread_takes_the_call():
    bn, x = nn.BatchNorm1d(3), torch.randn(4, 3)
    with intercept_batch_norm(lambda call: torch.zeros(1)):
        with intercept_batch_norm(lambda call: torch.ones(1)):
            assert bn(x).item() == 1
        assert bn(x).item() == 0


def test_another_threads_calls_reach_pytorch_or_the_owner_of_their_layer():
    """A thread without a handler of its own (as the autograd engine's CUDA threads, where backward
    recomputes checkpointed layers) reaches the handler that owns the layer, or PyTorch."""
    owned, foreign, x = nn.BatchNorm1d(3), nn.BatchNorm1d(3), torch.randn(4, 3)
    expected = F.batch_norm(x, None, None, training=True)
    with intercept_batch_norm(lambda call: torch.full((1,), 7.0), [owned]):
        assert in_thread(lambda: owned(x)).item() == 7
        assert torch.equal(in_thread(lambda: foreign(x)), expected)
        assert torch.equal(in_thread(lambda: F.batch_norm(x, None, None, training=True)), expected)
    assert torch.equal(in_thread(lambda: owned(x)), expected)


def test_batch_norm_is_restored_once_the_last_of_overlapping_intercepts_ends():
    original, entered, leave = F.batch_norm, threading.Event(), threading.Event()

    def other():
        with intercept_batch_norm(lambda call: call.input):
            entered.set()
            leave.wait()

    thread = threading.Thread(target=other)
    thread.start()
    entered.wait()
    with intercept_batch_norm(lambda call: call.input):
        pass
    assert F.batch_norm is not original  # the other thread's intercept is still active
    leave.set()
    thread.join()
    assert F.batch_norm is original


def make(seed, bn="two_pass"):
    torch.manual_seed(seed)
    model = ResidualNet(blocks=1).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if bn == "two_pass":
        bn = autobatch.TwoPass(phase1_memory_format=torch.preserve_format)
    return model, optimizer, autobatch.wrap(model, optimizer, 8, ce, micro_batch=3, bn=bn)


def batches(seed, count=6):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=generator, dtype=torch.float64),
             torch.randint(0, 5, (8,), generator=generator)) for _ in range(count)]


def train(ab, data, start=None):
    if start is not None:
        start.wait()
    return [ab.step(x, y) for x, y in data]


def plain_training(model, data, start=None):
    """A third thread's own training-mode BatchNorm, without autobatch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if start is not None:
        start.wait()
    losses = []
    for x, y in data:
        optimizer.zero_grad()
        loss = ce(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("bn", ["two_pass", "micro"])
def test_two_threads_train_exactly_as_alone_and_a_third_threads_batch_norm_is_untouched(bn):
    runs = [make(seed, bn) for seed in (1, 2)]
    data = [batches(seed) for seed in (11, 12)]
    torch.manual_seed(3)
    plain = ResidualNet(blocks=1).double()
    plain_reference = copy.deepcopy(plain)
    plain_data = batches(13)
    # Alone, one after the other.
    references = [make(seed, bn) for seed in (1, 2)]
    expected = [train(ab, batch) for (_, _, ab), batch in zip(references, data)]
    expected_plain = plain_training(plain_reference, plain_data)
    # Together: each thread's steps interleave with the others' at every operation.
    start = threading.Barrier(3)
    results, errors = {}, []

    def run(name, work):
        try:
            results[name] = work()
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index, lambda ab=ab, batch=batch: train(ab, batch, start)))
               for index, ((_, _, ab), batch) in enumerate(zip(runs, data))]
    threads.append(threading.Thread(target=run, args=("plain", lambda: plain_training(plain, plain_data, start))))
    original = F.batch_norm
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert F.batch_norm is original
    for index, (model, _, _) in enumerate(runs):
        assert results[index] == expected[index]
        assert_same_state(model_state(references[index][0]), model_state(model))
    assert results["plain"] == expected_plain
    assert_same_state(model_state(plain_reference), model_state(plain))


def test_ctrl_c_anywhere_in_the_interception_leaves_batch_norm_as_pytorch_s():
    """SIGINT at every line the interception runs (install, clean-up): once the next intercept has come and
    gone, the process's F.batch_norm is PyTorch's again and no owner or handler is left."""
    import sys

    from autobatch.batchnorm import intercept

    original = F.batch_norm
    layer = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    target, interrupted = 1, 0
    while True:
        trace, seen = interrupt_at(target, lambda code: code.co_filename == intercept.__file__ and code.co_name in (
            "__enter__", "__exit__", "_remove", "_repair", "intercept_batch_norm"))
        sys.settrace(trace)
        try:
            with intercept.intercept_batch_norm(lambda call: call.input, [layer]):
                layer(x)
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            sys.settrace(None)
        with intercept.intercept_batch_norm(lambda call: call.input, [layer]):  # the next step
            layer(x)
        assert F.batch_norm is original and not intercept._owners and intercept._active == 0, target
        assert not getattr(intercept._local, "handlers", []), target
        if seen[0] < target:
            break
        target += 1
    assert interrupted == target - 1 > 10  # every line was interrupted once, and each raised KeyboardInterrupt
