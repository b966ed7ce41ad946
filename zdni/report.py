"""`zdni report`: plots and a markdown table comparing runs, from their metrics.jsonl files.

Runs that differ only in their seed form one variant: its curves are the mean over seeds with
the min-max spread shaded (zdni/plots.py), and the table gives mean +- standard deviation.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from zdni import methods, plots
from zdni.labels import label_all
from zdni.runs import ReportError, Run, Variant, find_runs

__all__ = ["ReportError", "build_report", "find_runs", "group"]


def order(variant: Variant) -> tuple[int, bool, int, str]:
    """backprop, then sg, then full, then the other methods; unconditioned first; then by
    frozen stage and label."""
    cfg = variant.runs[0].config
    known = methods.names()
    mode = known.index(cfg["mode"]) if cfg.get("mode") in known else len(known)
    return mode, bool(cfg.get("conditioned")), cfg.get("freeze_stage") or 0, variant.label


def group(runs: list[Run], given: dict[str, str] | None = None) -> list[Variant]:
    """Variants in a fixed order, each labelled by what differs between them (model first);
    `given` maps a run's directory to a label of the user's, which wins over the run's own."""
    for run in runs:
        text = (given or {}).get(os.path.abspath(run.path))
        if text:
            run.start.setdefault("config", {})["label"] = text
    by_key: dict[tuple[Any, ...], Variant] = {}
    for run in runs:
        by_key.setdefault(run.key, Variant("")).runs.append(run)
    variants = list(by_key.values())
    names = label_all([(v.runs[0].config, v.runs[0].start.get("runner")) for v in variants])
    for v, name in zip(variants, names):
        v.label = name
        for r in v.runs:
            r.label = name
    return sorted(variants, key=order)  # the same colours in every report


# -- table --------------------------------------------------------------------------------------
def run_numbers(run: Run, target: float) -> dict[str, Any]:
    """Best and final accuracy (on the validation set where the run had one: Run.accuracy),
    wall time, samples/s and time to the target accuracy."""
    epochs = run.kind("epoch")
    accs: list[float] = [r["val_accuracy"] if "val_accuracy" in r else r["test_accuracy"]
                         for r in epochs if "val_accuracy" in r or "test_accuracy" in r]
    reached = [wall for _, wall, acc in run.accuracy() if acc >= target]
    return {"best": max(accs, default=None), "final": accs[-1] if accs else None,
            "wall_s": epochs[-1]["wall_s"],
            "sps": epochs[-1].get("samples_per_s"), "to_target": reached[0] if reached else None,
            "epochs": len(epochs)}


def fmt(values: list[Any], digits: int, scale: float = 1.0) -> str:
    """'x' for one value, 'mean +- sd' for several, '-' for none."""
    got = [scale * v for v in values if v is not None]
    if not got:
        return "-"
    if len(values) == 1:
        return f"{got[0]:.{digits}f}"
    sd = statistics.stdev(got) if len(got) > 1 else 0.0
    text = f"{statistics.fmean(got):.{digits}f} ± {sd:.{digits}f}"
    return text if len(got) == len(values) else f"{text} ({len(got)}/{len(values)})"


def table(variants: list[Variant], target: float) -> str:
    goal = f"time to {100 * target:g}% (s)"
    head = ["variant", "runs", "best acc (%)", "final acc (%)", "wall (s)", "samples/s", goal]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for v in variants:
        nums = [run_numbers(r, target) for r in v.runs]
        col = {k: [n[k] for n in nums] for k in nums[0]}
        lines.append(f"| {v.label} | {len(v.runs)} | {fmt(col['best'], 2, 100)} | "
                     f"{fmt(col['final'], 2, 100)} | {fmt(col['wall_s'], 1)} | "
                     f"{fmt(col['sps'], 0)} | {fmt(col['to_target'], 0)} |")
    lines += ["", "| run | variant | seed | epochs | best acc (%) | final acc (%) | wall (s) | "
              f"samples/s | {goal} |", "|" + " --- |" * 9]
    for v in variants:
        for r in v.runs:
            n = run_numbers(r, target)
            lines.append(f"| {os.path.basename(r.path.rstrip('/'))} | {v.label} | "
                         f"{r.config.get('seed')} | {n['epochs']} | {fmt([n['best']], 2, 100)} | "
                         f"{fmt([n['final']], 2, 100)} | {fmt([n['wall_s']], 1)} | "
                         f"{fmt([n['sps']], 0)} | {fmt([n['to_target']], 0)} |")
    return "\n".join(lines)


def build_report(paths: list[str], out_dir: str, target: float = 0.97,
                 title: str = "zdni runs", labels: dict[str, str] | None = None) -> str:
    """Write the plots and OUT/report.md for the runs under `paths`; returns report.md's path.
    `labels` names runs by their directory (a label of the user's)."""
    from zdni.seqreport import is_sequence, sequence_report

    found = find_runs(paths)
    runs = [r for r in found if not is_sequence(r)]
    os.makedirs(out_dir, exist_ok=True)
    text = [f"# {title}", ""]
    if runs:
        variants = group(runs, {os.path.abspath(k): v for k, v in (labels or {}).items()})
        drawn = plots.draw_all(variants, runs, out_dir)
        text += [f"{len(runs)} runs, {len(variants)} variants; {plots.context(runs)}. Accuracy "
                 "is on the test set; ± is the standard deviation over seeds; wall time and "
                 "samples/s include evaluation. Iteration curves put what the stages reported "
                 "at the number of batches fed when it arrived (up to max-inflight later).", "",
                 table(variants, target), ""]
        text += [f"![{p[:-4]}]({p})" for p in drawn]
    sequences = [r for r in found if is_sequence(r)]
    if sequences:
        lines, drawn = sequence_report(sequences, out_dir)
        text += ["", "## Recurrent runs (zdni sequence)", "", *lines, ""]
        text += [f"![{p[:-4]}]({p})" for p in drawn]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(text) + "\n")
    return path
