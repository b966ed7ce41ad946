"""The report's part for recurrent runs (`zdni sequence`): the curriculum (longest length solved
against iterations) for Copy and Repeat Copy, and test bits per character against iterations
and wall time for language models; one line per setting, the mean over its seeds."""

from __future__ import annotations

import os
import statistics
from typing import Any

from zdni import plots
from zdni.runs import Run

__all__ = ["is_sequence", "sequence_report"]


def is_sequence(run: Run) -> bool:
    return run.start.get("runner") == "sequence"


def label(run: Run) -> str:
    c = run.config
    task = os.path.basename(c["dataset"]) if c.get("task") == "text" else c.get("task")
    return f"{task} {c.get('mode')} T={c.get('T')} {c.get('cell')}-{c.get('hidden')}"


def _groups(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for run in runs:
        out.setdefault(label(run), []).append(run)
    return dict(sorted(out.items()))


def _mean_curve(runs: list[Run], x: str, y: str) -> tuple[list[float], list[float]]:
    """The mean of `y` over the runs at each `x` all of them recorded."""
    per = [{r[x]: r[y] for r in run.kind("seq") if y in r} for run in runs]
    xs = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return xs, [statistics.fmean(p[v] for p in per) for v in xs]


def sequence_report(runs: list[Run], out_dir: str) -> tuple[list[str], list[str]]:
    """(markdown lines: a table, figures: file names under out_dir) for the recurrent runs."""
    groups = _groups(runs)
    lines = ["| setting | seeds | iterations | longest solved (each seed) | test bits/char "
             "| wall (s) |", "| --- | --- | --- | --- | --- | --- |"]
    for name, group in groups.items():
        ends = [run.kind("done")[-1] for run in group]
        solved = ", ".join(str(e["solved"]) for e in ends) if "solved" in ends[0] else "-"
        bpc = f"{statistics.fmean(e['bpc'] for e in ends):.3f}" if "bpc" in ends[0] else "-"
        lines.append(f"| {name} | {len(group)} | {ends[0]['iteration']} | {solved} | {bpc} | "
                     f"{statistics.fmean(e['wall_s'] for e in ends):.1f} |")
    drawn = []
    copies = {k: g for k, g in groups.items() if g[0].config.get("task") != "text"}
    texts = {k: g for k, g in groups.items() if g[0].config.get("task") == "text"}
    if copies:
        fig, axes = plots.figure("Curriculum: longest sequence solved", _context(copies))
        for name, group in copies.items():
            axes[0].step(*_mean_curve(group, "iteration", "solved"), where="post", label=name)
        axes[0].set_xlabel("iteration (batches of sequences)")
        axes[0].set_ylabel("longest length solved")
        drawn.append(os.path.basename(plots.save(fig, axes, out_dir, "curriculum.png")))
    if texts:
        fig, axes = plots.figure("Language model: test bits per character", _context(texts), 2)
        for name, group in texts.items():
            axes[0].plot(*_mean_curve(group, "iteration", "bpc"), label=name)
            axes[1].plot(*_mean_curve(group, "wall_s", "bpc"), label=name)
        axes[0].set_xlabel("iteration (windows of text)")
        axes[1].set_xlabel("wall time (s)")
        for ax in axes:
            ax.set_ylabel("bits per character")
        drawn.append(os.path.basename(plots.save(fig, axes, out_dir, "bits_per_char.png")))
    return lines, drawn


def _context(groups: dict[str, list[Run]]) -> str:
    seeds = {len(g) for g in groups.values()}
    batch = {g[0].config.get("batch_size") for g in groups.values()}
    text: Any = f"batch {batch.pop() if len(batch) == 1 else 'mixed'}"
    if max(seeds) > 1:
        text += "; lines: mean over seeds"
    return str(text)
