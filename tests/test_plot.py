"""A plan's picture: drawn from a measured plan, and the caller's matplotlib settings left as they were."""
import pytest
import torch

import autobatch
from tests.common import ResidualNet, data


def test_a_measured_plan_is_drawn_and_matplotlib_is_left_as_it_was(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    from autobatch.plot import LEGIBLE, plot_plan

    model = ResidualNet(blocks=1).double()
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, torch.nn.CrossEntropyLoss(),
                        memory_budget="4MiB", cache=False)
    ab.tune(*data(16))
    before = dict(matplotlib.rcParams)
    path = plot_plan(ab.plan, tmp_path / "plan.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert before["font.size"] != LEGIBLE["font.size"]  # the picture's own sizes would show through
    assert dict(matplotlib.rcParams) == before
