"""A picture of a plan: the measured peaks against the micro-batch, the memory model's line for each
sample size, the budget and the micro-batch chosen (matplotlib, an optional extra: ``pip install
"torch-autobatch[plot]"``).

    plot_plan(ab.plan, "plan.png")
    plot_plan([ab.tune(small), ab.tune(large)], "sizes.png")     # one line per sample size
"""
from __future__ import annotations

import pathlib
from typing import Sequence, Union

from autobatch.modes import Mode
from autobatch.plan import Plan
from autobatch.planning.search import fitted_line

__all__ = ["LEGIBLE", "plot_plan", "pyplot"]

MIB = 2 ** 20
#: Font sizes in points that stay readable when a figure of up to 8 inches is shown at a page's width.
LEGIBLE = {"font.size": 12, "axes.titlesize": 12, "axes.labelsize": 12, "legend.fontsize": 11,
           "xtick.labelsize": 11, "ytick.labelsize": 11}


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ImportError('drawing a plan needs matplotlib: pip install "torch-autobatch[plot]"') from None
    return matplotlib


def pyplot():
    """matplotlib's pyplot drawing to files with our figures' font sizes (`LEGIBLE`), for scripts: it
    switches the process to the Agg backend and sets its defaults (`plot_plan` leaves both alone).

        plt = pyplot()
        figure, axes = plt.subplots(figsize=(7, 4))
    """
    _matplotlib().use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(LEGIBLE)
    return plt


def plot_plan(plans: Union[Plan, Sequence[Plan]], path: Union[str, pathlib.Path]) -> pathlib.Path:
    """Draw a plan (or the plans of several sample sizes, one line each) into the PNG file ``path``.

    The figure is drawn without pyplot: the caller's backend, open figures and settings stay as they were.
    """
    plans = [plans] if isinstance(plans, Plan) else list(plans)
    plan = plans[0]
    matplotlib = _matplotlib()
    from matplotlib.figure import Figure

    with matplotlib.rc_context(LEGIBLE):
        figure = Figure(figsize=(7.2, 4.6))
        axes = figure.subplots()
        if plan.candidates and len(plans) == 1:
            _candidates(axes, plan)
        else:
            _sizes(axes, plans)
        if plan.budget_bytes is not None:
            axes.axhline(plan.budget_bytes / MIB, color="tab:red", linestyle="--",
                         label="budget (after the safety margin)")
        axes.set_ylabel("peak (MiB)")
        title = f"target_batch {plan.target_batch}, bn={plan.bn}"
        detail = f": micro-batches {plan.splits}" if len(plans) == 1 else f", {len(plans)} sample sizes"
        axes.set_title(title + detail)
        axes.legend(loc="best")
        figure.tight_layout()
        path = pathlib.Path(path)
        figure.savefig(path, dpi=110)
    return path


def _sizes(axes, plans: list[Plan]) -> None:
    """Per sample size: the steps measured there, the model's line out to the whole batch, and the choice."""
    target = plans[0].target_batch // plans[0].world_size
    colours = ["tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    for index, plan in enumerate(plans):
        colour = colours[index % len(colours)]
        label = f"{plan.sample_size} elements per sample" if plan.sample_size else "measured"
        points = [(n, peak) for n, s, peak in plan.measured if s == plan.sample_size] or \
            [(n, peak) for n, peak in plan.points if peak is not None]
        if points:
            axes.scatter([n for n, _ in points], [peak / MIB for _, peak in points], color=colour, zorder=3,
                         label="measured peaks" if len(plans) == 1 else None)
        if plan.fixed_bytes is not None and plan.per_sample_bytes is not None:
            fixed, per_sample = plan.fixed_bytes, plan.per_sample_bytes
        elif len(points) > 1:
            fixed, per_sample = fitted_line(dict(points))
        else:
            continue
        axes.plot([0, target], [fixed / MIB, (fixed + per_sample * target) / MIB], color=colour, alpha=0.7,
                  label=f"{label}: {per_sample / MIB:.2f} MiB per sample")
        axes.axvline(plan.micro_batch, color=colour, linestyle=":", alpha=0.8)
        axes.scatter([plan.micro_batch], [(fixed + per_sample * plan.micro_batch) / MIB], marker="*", s=120,
                     color=colour, zorder=4, label=f"runs {plan.micro_batch} (capacity {plan.capacity})")
    axes.set_xlim(0, target * 1.03)
    axes.set_xlabel("micro-batch (samples)")


def _candidates(axes, plan: Plan) -> None:
    labels = [c.label.split(" (fails")[0] for c in plan.candidates]
    peaks = [0.0 if c.peak_bytes is None else c.peak_bytes / MIB for c in plan.candidates]
    colours = ["tab:green" if _chosen(plan, c) else "tab:blue" if c.exact else "tab:orange" for c in plan.candidates]
    axes.bar(range(len(peaks)), peaks, color=colours)
    axes.set_xticks(range(len(peaks)), labels, rotation=30, ha="right")
    axes.set_xlabel("candidate (green: chosen; blue: the whole batch, exact; orange: micro-batches)")


def _chosen(plan: Plan, candidate) -> bool:
    """Whether ``candidate`` is what the plan runs: its checkpointing policy, or two_pass's micro-batches."""
    if plan.bn is Mode.EXACT:
        return candidate.exact and candidate.label == plan.checkpointing.label
    return not candidate.exact
