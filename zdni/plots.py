"""The report's figures: each variant's mean curve over seeds with its min-max band."""

from __future__ import annotations

import os
import statistics
import textwrap
from collections.abc import Callable
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from zdni import labels  # noqa: E402
from zdni.runs import Run, Variant  # noqa: E402

CLOSE_UP = 200  # iterations in the close-up plot
SMOOTH = 5  # records in the moving average of the full-length loss curves
LEGEND_WRAP = 60  # characters per line of a legend label
PLAIN = FuncFormatter(lambda v, _: f"{v:.3g}")

# -- curves -------------------------------------------------------------------------------------
Series = tuple[list[float], list[float], list[float], list[float]]  # x, mean, low, high


def spread(per_run: list[dict[int, tuple[float, float]]]) -> Series:
    """Mean and min-max over runs; x is the mean x.

    Runs are aligned by iteration: exactly where they all recorded the same iterations, else by
    linear interpolation over the iterations any of them recorded within the range all cover
    (a distributed run's loss reaches the driver in bursts, so iterations differ by seed).
    """
    if not per_run:
        return [], [], [], []
    lo = max(min(d) for d in per_run)
    hi = min(max(d) for d in per_run)
    grid = np.array(sorted({it for d in per_run for it in d if lo <= it <= hi}), dtype=float)
    xs, ys = [], []
    for d in per_run:
        its = np.array(sorted(d), dtype=float)
        xs.append(np.interp(grid, its, [d[int(i)][0] for i in its]))
        ys.append(np.interp(grid, its, [d[int(i)][1] for i in its]))
    y = np.array(ys)
    return (list(np.mean(xs, axis=0)), list(y.mean(axis=0)), list(y.min(axis=0)),
            list(y.max(axis=0)))


def smooth(values: list[float], n: int) -> list[float]:
    return [sum(values[max(0, i - n + 1): i + 1]) / len(values[max(0, i - n + 1): i + 1])
            for i in range(len(values))]


def plot(variants: list[Variant], series: Callable[[Run], dict[int, tuple[float, float]]],
         ax: Any, smooth_n: int = 1, percent: bool = False) -> bool:
    """Draw each variant's mean line and spread band on ax; False if no variant had data."""
    drawn = False
    for i, v in enumerate(variants):
        per_run = [d for d in (series(r) for r in v.runs) if d]
        xs, mean, low, high = spread(per_run)
        if not xs:
            continue
        scale = 100.0 if percent else 1.0
        mean, low, high = ([scale * y for y in smooth(s, smooth_n)] for s in (mean, low, high))
        color = f"C{i % 10}"
        ax.plot(xs, mean, color=color, lw=1.6, label=v.name,
                marker="o" if len(xs) < 30 else None, ms=3)  # a short series stays visible
        if len(per_run) > 1:
            ax.fill_between(xs, low, high, color=color, alpha=0.2, lw=0)
        drawn = True
    return drawn


def iter_field(name: str, stage: str | None = None, limit: int | None = None
               ) -> Callable[[Run], dict[int, tuple[float, float]]]:
    """A per-run series of an iter record field (of one stage when `stage` is given)."""
    def series(run: Run) -> dict[int, tuple[float, float]]:
        out = {}
        for r in run.kind("iter"):
            value = r.get(name)
            if stage is not None:
                value = (value or {}).get(stage)
            # a loss of exactly 0 (M's zero init, first iteration) has no place on a log axis
            if value and (limit is None or r["iteration"] <= limit):
                out[r["iteration"]] = (float(r["iteration"]), float(value))
        return out
    return series


def test_loss(run: Run) -> dict[int, tuple[float, float]]:
    """(iteration, test loss) of every eval and epoch record."""
    return {int(r.get("iterations", r.get("iteration", 0))): (
        float(r.get("iterations", r.get("iteration", 0))), float(r["test_loss"]))
        for r in run.records if r["kind"] in ("eval", "epoch") and r.get("test_loss") is not None}


def accuracy_by(axis: str) -> Callable[[Run], dict[int, tuple[float, float]]]:
    def series(run: Run) -> dict[int, tuple[float, float]]:
        return {it: (float(it if axis == "iteration" else wall), acc)
                for it, wall, acc in run.accuracy()}
    return series


# -- figures ------------------------------------------------------------------------------------
def context(runs: list[Run]) -> str:
    """What all the runs share (model, dataset, stages, batch size; zdni.labels.context) and
    what the bands mean."""
    text = labels.context([(r.config, r.start.get("runner")) for r in runs])
    if any(len({r.config.get('seed') for r in runs if r.label == x.label}) > 1 for x in runs):
        text += ("; " if text else "") + "lines: mean over seeds, bands: min-max"
    return text


def figure(title: str, ctx: str, panels: int = 1) -> tuple[Any, list[Any]]:
    # constrained layout makes room for the legend below the axes (see save)
    fig, axes = plt.subplots(1, panels, figsize=(9 if panels == 1 else 5.2 * panels, 5.4),
                             squeeze=False, layout="constrained")
    fig.suptitle(f"{title}\n{ctx}" if ctx else title, fontsize=12)
    for ax in axes[0]:
        ax.grid(True, alpha=0.3)
    return fig, list(axes[0])


def place_legend(fig: Any, axes: list[Any]) -> Any:
    """One legend of every curve on any panel, below the axes (outside them: a legend never
    covers data), long labels wrapped; the figure grows by the legend's rows. None if no curve."""
    legend: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if not legend:
        return None
    wrapped = [textwrap.fill(label, LEGEND_WRAP) for label in legend]
    columns = 1 if max(map(len, legend)) > LEGEND_WRAP // 2 else min(len(legend), 3)
    lines = sum(w.count("\n") + 1 for w in wrapped) if columns == 1 else -(-len(legend) // columns)
    fig.set_figheight(fig.get_figheight() + 0.2 * lines)
    return fig.legend(list(legend.values()), wrapped, fontsize=8, loc="outside lower center",
                      ncols=columns, frameon=False)


def save(fig: Any, axes: list[Any], out_dir: str, name: str) -> str:
    """Write the figure with its legend below the axes (place_legend)."""
    place_legend(fig, axes)
    for ax in axes:
        if ax.get_yscale() == "log":  # plain numbers, not 2.4x10^0; minor ones within a decade
            low, high = ax.get_ylim()
            ax.yaxis.set_major_formatter(PLAIN)
            ax.yaxis.set_minor_formatter(PLAIN if high / low < 10 else NullFormatter())
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stages_with(runs: list[Run], name: str) -> list[str]:
    found = {s for r in runs for rec in r.kind("iter") for s in (rec.get(name) or {})}
    return sorted(found, key=int)


def max_lag(run: Run) -> dict[int, tuple[float, float]]:
    return {r["iteration"]: (float(r["iteration"]), float(max(r["lag"].values())))
            for r in run.kind("iter") if r.get("lag")}


def mean_staleness(run: Run) -> dict[int, tuple[float, float]]:
    return {r["iteration"]: (float(r["iteration"]), statistics.fmean(r["staleness"].values()))
            for r in run.kind("iter") if r.get("staleness")}


def draw_all(variants: list[Variant], runs: list[Run], out_dir: str) -> list[str]:
    """Write every plot the runs have data for; returns the file names."""
    ctx = context(runs)
    batch = {r.config.get("batch_size") for r in runs}
    xlabel = f"iteration (batches of {batch.pop()})" if len(batch) == 1 else "iteration (batches)"
    names = []

    fig, axes = figure("Training loss", ctx)
    plot(variants, iter_field("train_loss"), axes[0], SMOOTH)
    axes[0].set(xlabel=xlabel, ylabel="train loss (cross-entropy, nats; log scale)", yscale="log")
    names.append(save(fig, axes, out_dir, "loss.png"))

    fig, axes = figure(f"Training loss, first {CLOSE_UP} iterations", ctx)
    plot(variants, iter_field("train_loss", limit=CLOSE_UP), axes[0])
    axes[0].set(xlabel=xlabel, ylabel="train loss (cross-entropy, nats)")
    names.append(save(fig, axes, out_dir, "loss_first200.png"))

    if any(test_loss(r) for r in runs):
        fig, axes = figure("Test loss", ctx)
        plot(variants, test_loss, axes[0])
        axes[0].set(xlabel=xlabel, ylabel="test loss (cross-entropy, nats; log scale)",
                    yscale="log")
        names.append(save(fig, axes, out_dir, "test_loss.png"))

    if any(iter_field("train_accuracy")(r) for r in runs):
        fig, axes = figure("Training accuracy (batches before their update)", ctx)
        plot(variants, iter_field("train_accuracy"), axes[0], SMOOTH, percent=True)
        axes[0].set(xlabel=xlabel, ylabel="train accuracy (%)")
        names.append(save(fig, axes, out_dir, "train_accuracy.png"))

    for axis, label in (("iteration", xlabel), ("time", "wall time (s)")):
        fig, axes = figure(f"Test accuracy by {'iterations' if axis == 'iteration' else 'wall time'}",
                           ctx)
        plot(variants, accuracy_by(axis), axes[0], percent=True)
        accs = [100 * a for r in runs for _, _, a in r.accuracy()]
        axes[0].set(xlabel=label, ylabel="test accuracy (%)",
                    ylim=(max(0.0, min(accs) - 1.0), min(100.0, max(accs) + 0.5)))
        names.append(save(fig, axes, out_dir, f"accuracy_{axis}.png"))

    for name, what, unit in (("grad_loss", "Synthetic gradient loss", "M: MSE to the true gradient"),
                             ("input_loss", "Synthetic input loss", "I: MSE to the true input")):
        stages = stages_with(runs, name)
        if not stages:
            continue
        fig, axes = figure(what, ctx, len(stages))
        for ax, s in zip(axes, stages):
            plot(variants, iter_field(name, s), ax, SMOOTH)
            ax.set(title=f"stage {s}", xlabel=xlabel, ylabel=f"{unit} (log scale)", yscale="log")
        names.append(save(fig, axes, out_dir, f"{name}.png"))

    if any(max_lag(r) for r in runs):
        fig, axes = figure("Pipeline: queue depth and staleness", ctx, 2)
        plot(variants, max_lag, axes[0])
        axes[0].set(title="slowest stage's lag", xlabel=xlabel,
                    ylabel="batches fed but not yet trained by the stage")
        plot(variants, mean_staleness, axes[1], SMOOTH)
        axes[1].set(title="true-gradient staleness, mean over stages", xlabel=xlabel,
                    ylabel="iterations the stage had moved on")
        names.append(save(fig, axes, out_dir, "pipeline.png"))
    return [os.path.basename(n) for n in names]
