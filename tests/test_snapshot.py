import torch
from torch import nn

from autobatch.transaction import trial_transaction as preserved
from autobatch.transaction import update_transaction as undone_on_error
from tests.common import assert_same_state, model_state


def test_preserved_puts_everything_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model[2].eval()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = model_state(model)
    state_before = {k: v.clone() for k, v in optimizer.state[model[0].weight].items()}
    rng = torch.get_rng_state()
    with preserved(model, optimizer):
        model.train()
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            optimizer.step()
    assert_same_state(before, model_state(model))
    assert model[2].training is False and model[1].training is True
    for key, value in optimizer.state[model[0].weight].items():
        assert torch.equal(value, state_before[key]), key
    assert torch.equal(torch.get_rng_state(), rng)


def test_preserved_clears_state_the_trials_created():
    model = nn.Linear(3, 3)
    optimizer = torch.optim.Adam(model.parameters())
    with preserved(model, optimizer):
        model(torch.randn(2, 3)).sum().backward()
        optimizer.step()
        assert optimizer.state
    assert not optimizer.state
    assert all(p.grad is None for p in model.parameters())


def test_undone_on_error_puts_back_a_half_applied_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).double()
    model[0].requires_grad_(False)  # frozen: no gradient, never updated, nothing to copy
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(8, 4, dtype=torch.float64)).sum().backward()
    before = model_state(model)
    params = list(model.parameters())
    try:
        with undone_on_error(params, optimizer):
            optimizer.step()  # creates the state lazily and updates every parameter
            optimizer.param_groups[0]["lr"] = 5.0
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert_same_state(before, model_state(model))
    assert len(optimizer.state) == 0 and optimizer.param_groups[0]["lr"] == 0.1
    with undone_on_error(params, optimizer):  # no error: the update stays
        optimizer.step()
    assert not torch.equal(before["1.weight"], model[1].weight)
    assert {s["step"].item() for s in optimizer.state.values()} == {1.0}
