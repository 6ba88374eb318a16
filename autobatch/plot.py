"""A picture of a plan: each measured trial's peak against the micro-batch, the fitted line, the
budget and the size chosen (matplotlib, an optional extra: ``pip install "torch-autobatch[plot]"``).

    plot_plan(ab.plan, "plan.png")
"""
from __future__ import annotations

import pathlib
from typing import Union

from autobatch.modes import Mode
from autobatch.plan import Plan
from autobatch.planning.search import fitted_line

__all__ = ["plot_plan"]

MIB = 2 ** 20


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError('drawing a plan needs matplotlib: pip install "torch-autobatch[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_plan(plan: Plan, path: Union[str, pathlib.Path]) -> pathlib.Path:
    """Draw ``plan`` into the PNG file ``path``; returns the path."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    if plan.candidates:
        _candidates(axes, plan)
    else:
        _trials(axes, plan)
    if plan.budget_bytes is not None:
        axes.axhline(plan.budget_bytes / MIB, color="tab:red", linestyle="--",
                     label="budget (after the safety margin)")
    axes.set_ylabel("measured peak (MiB)")
    axes.set_title(f"target_batch {plan.target_batch}, bn={plan.bn}: micro-batches {plan.splits}")
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    path = pathlib.Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _trials(axes, plan: Plan) -> None:
    measured = {n: peak for n, peak in plan.points if peak is not None}
    failed = [n for n, peak in plan.points if peak is None]
    axes.scatter(list(measured), [peak / MIB for peak in measured.values()], color="tab:blue", zorder=3,
                 label="trial steps")
    if failed:
        axes.scatter(failed, [plan.budget_bytes / MIB] * len(failed), marker="x", color="tab:red", zorder=3,
                     label="trial out of memory")
    if len(measured) > 1:
        fixed, per_sample = fitted_line(measured)
        largest = max(list(measured) + [plan.micro_batch, max(plan.splits)])
        axes.plot([0, largest], [fixed / MIB, (fixed + per_sample * largest) / MIB], color="tab:blue", alpha=0.6,
                  label=f"fitted: {fixed / MIB:.1f} MiB + {per_sample / MIB:.2f} MiB per sample")
    axes.axvline(plan.micro_batch, color="tab:green", label=f"capacity: {plan.micro_batch}")
    axes.axvline(max(plan.splits), color="tab:green", linestyle=":", label=f"runs: {max(plan.splits)}")
    axes.set_xlabel("micro-batch (samples)")


def _candidates(axes, plan: Plan) -> None:
    labels = [c.label.split(" (fails")[0] for c in plan.candidates]
    peaks = [0.0 if c.peak_bytes is None else c.peak_bytes / MIB for c in plan.candidates]
    chosen = [plan.checkpointing.label if plan.bn is Mode.EXACT else None]
    colours = ["tab:green" if c.exact and c.label == chosen[0] else "tab:blue" if c.exact else "tab:orange"
               for c in plan.candidates]
    axes.bar(range(len(peaks)), peaks, color=colours)
    axes.set_xticks(range(len(peaks)), labels, rotation=30, ha="right", fontsize="small")
    axes.set_xlabel("candidate (green: chosen; orange: micro-batches, not exact)")
