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


def modes():
    from torch.overrides import _get_current_function_mode_stack

    return _get_current_function_mode_stack()


def test_nothing_process_wide_is_patched_and_an_error_leaves_no_mode():
    original = F.batch_norm
    with pytest.raises(KeyError):
        with intercept_batch_norm(lambda call: call.input):
            assert F.batch_norm is original and len(modes()) == 1
            raise KeyError
    assert F.batch_norm is original and modes() == []


def test_eval_mode_calls_pass_through():
    bn = nn.BatchNorm2d(3).eval()
    seen = []
    with intercept_batch_norm(seen.append):
        bn(torch.randn(2, 3, 4, 4))
    assert seen == []


def test_keyword_arguments_are_read_as_pytorch_reads_them():
    seen = []
    x = torch.randn(4, 3)
    with intercept_batch_norm(lambda call: seen.append(call) or call.input):
        F.batch_norm(x, None, None, training=True, eps=0.5, momentum=0.3)
        F.batch_norm(x, None, None, None, None, True, 0.2, 0.25)
        F.batch_norm(x, torch.zeros(3), torch.ones(3), training=False)
    assert [(c.momentum, c.eps) for c in seen] == [(0.3, 0.5), (0.2, 0.25)]


def test_the_innermost_handler_of_the_thread_takes_the_call():
    bn, x = nn.BatchNorm1d(3), torch.randn(4, 3)
    with intercept_batch_norm(lambda call: torch.zeros(1)):
        with intercept_batch_norm(lambda call: torch.ones(1)):
            assert bn(x).item() == 1
        assert bn(x).item() == 0


def test_another_thread_reaches_pytorch():
    """Another thread (a data loader's, a second model's) never sees this thread's intercept."""
    layer, x = nn.BatchNorm1d(3), torch.randn(4, 3)
    expected = F.batch_norm(x, None, None, training=True)
    with intercept_batch_norm(lambda call: torch.full((1,), 7.0)):
        assert layer(x).item() == 7
        assert torch.equal(in_thread(lambda: layer(x)), expected)
        assert torch.equal(in_thread(lambda: F.batch_norm(x, None, None, training=True)), expected)


def test_backward_and_its_recomputation_reach_the_handler():
    """Checkpointing recomputes BatchNorm inside backward, under the state of the thread that called it
    (on a GPU the autograd engine's own thread: PyTorch carries the mode stack there)."""
    from torch.utils.checkpoint import checkpoint

    layer, x = nn.BatchNorm1d(3), torch.randn(4, 3, requires_grad=True)
    calls = []

    def handler(call):
        calls.append(call.input.shape)
        return call.input ** 2  # keeps its input for backward: the recomputation needs it

    with intercept_batch_norm(handler):
        checkpoint(layer, x, use_reentrant=False).sum().backward()
        assert len(calls) == 2  # the forward, then its recomputation in backward
        assert torch.equal(x.grad, 2 * x.detach())
        torch.autograd.backward([checkpoint(layer, x, use_reentrant=False).sum()], inputs=[x])
        assert len(calls) == 4 and torch.equal(x.grad, 4 * x.detach())
    assert modes() == []


def test_a_mode_left_on_the_stack_after_its_block_routes_nothing():
    """What a Ctrl-C between the block's end and the mode's pop leaves until the transaction pops it."""
    from torch.overrides import _pop_mode

    layer, x = nn.BatchNorm1d(3), torch.randn(4, 3)
    expected = F.batch_norm(x, None, None, training=True)
    intercept = intercept_batch_norm(lambda call: torch.zeros(1))
    intercept.__enter__()
    intercept._live = False  # __exit__ began, the pop did not happen
    try:
        assert torch.equal(F.batch_norm(x, None, None, training=True), expected)
    finally:
        _pop_mode()


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
    """SIGINT at every line the interception runs: once the step's transaction has put the thread's contexts
    back, F.batch_norm is PyTorch's, no mode is left, and the next intercept works."""
    import sys

    from autobatch.batchnorm import intercept
    from autobatch.transaction import ThreadContexts

    original = F.batch_norm
    layer = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    expected = F.batch_norm(x, None, None, training=True)
    target, interrupted = 1, 0
    while True:
        trace, seen = interrupt_at(target, lambda code: code.co_filename == intercept.__file__)
        contexts = ThreadContexts()
        sys.settrace(trace)
        try:
            with intercept.intercept_batch_norm(lambda call: call.input):
                layer(x)
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            sys.settrace(None)
        contexts.restore()
        assert F.batch_norm is original and modes() == [], target
        assert torch.equal(F.batch_norm(x, None, None, training=True), expected), target
        with intercept.intercept_batch_norm(lambda call: call.input):  # the next step
            assert layer(x) is x
        if seen[0] < target:
            break
        target += 1
    assert interrupted == target - 1 > 5  # every line was interrupted once, and each raised KeyboardInterrupt
