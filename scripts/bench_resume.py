"""Interrupt a distributed run with Ctrl-C and resume it, against the same run uninterrupted.

    python scripts/bench_resume.py --data-dir ../shared/data/mnist [--epochs 4] [--at 2.5]

Runs `zdni train --conditioned` (the README's command: fcn3, cDNI, 3 workers, the default
window of 4 batches in flight) twice with the same seed: once through, once sent SIGINT when
its metrics show it `--at` epochs in (1.5, the default: halfway through epoch 2) and then
`zdni train --resume`. Prints each one's final test accuracy, the history's epochs, wall
time and run directory size (docs/RESULTS.md records a run). With more than one batch
in flight the order of messages varies, so the two runs are not bit-identical; the claim is
that they end within 0.5 points.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from zdni.metrics import read_metrics


def train(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "zdni", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def interrupt_at(proc: subprocess.Popen[str], metrics: Path, epochs_in: float) -> int:
    """SIGINT once the run has fed `epochs_in` epochs' worth of batches; returns that count."""
    per_epoch = None
    while proc.poll() is None:
        if metrics.exists():
            records = read_metrics(str(metrics))
            iters = [r for r in records if r["kind"] == "iter"]
            epoch_rows = [r for r in records if r["kind"] == "epoch"]
            if per_epoch is None and epoch_rows:
                per_epoch = epoch_rows[0]["iterations"]
            if per_epoch and iters and iters[-1]["iteration"] >= epochs_in * per_epoch:
                proc.send_signal(signal.SIGINT)
                return int(iters[-1]["iteration"])
        time.sleep(0.2)
    raise SystemExit(f"the run ended before it was interrupted: {proc.communicate()[1][-800:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--at", type=float, default=1.5, help="epochs fed before Ctrl-C")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-resume")
    parser.add_argument("--extra", default="", help="more `zdni train` flags, one string")
    args = parser.parse_args()
    out = Path(args.out)
    common = ["--conditioned", "--data-dir", args.data_dir, "--epochs", str(args.epochs),
              "--seed", str(args.seed), "--quiet", *args.extra.split()]
    results = {}
    start = time.monotonic()
    whole = train([*common, "--out", str(out / "whole"), "--keep-redis"])  # to weigh it
    _, err = whole.communicate()
    assert whole.returncode == 0, err[-2000:]
    results["uninterrupted"] = {"wall_s": round(time.monotonic() - start, 1)}

    start = time.monotonic()
    cut = train([*common, "--out", str(out / "cut")])
    fed = interrupt_at(cut, out / "cut" / "metrics.jsonl", args.at)
    _, err = cut.communicate(timeout=120)
    assert cut.returncode == 130, err[-2000:]
    with open(out / "cut" / "checkpoint" / "state.json") as fh:
        state = json.load(fh)
    stopped = {"interrupted_after": fed, "checkpoint_iteration": state["iteration"],
               "checkpoint_epoch": state["loop"]["epoch"] + 1,
               "checkpoint_batch": state["loop"]["position"],
               "size_mb_interrupted": round(size_mb(out / "cut"), 2)}
    resumed = train(["--resume", str(out / "cut"), "--quiet"])
    _, err = resumed.communicate()
    assert resumed.returncode == 0, err[-2000:]
    results["interrupted+resumed"] = {"wall_s": round(time.monotonic() - start, 1), **stopped}

    for name, run in (("uninterrupted", "whole"), ("interrupted+resumed", "cut")):
        with open(out / run / "summary.json") as fh:
            summary = json.load(fh)
        results[name].update(
            test_accuracy=summary["test_accuracy"],
            history_epochs=[row["epoch"] for row in summary["history"]],
            history_accuracy=[round(row["test_accuracy"], 4) for row in summary["history"]],
            size_mb=round(size_mb(out / run) - size_mb(out / run / "redis"), 2),
            files=sorted(os.listdir(out / run)))
    results["uninterrupted"]["journal_mb_kept"] = round(size_mb(out / "whole" / "redis"), 2)
    gap = abs(results["uninterrupted"]["test_accuracy"]
              - results["interrupted+resumed"]["test_accuracy"])
    print(json.dumps({**results, "gap_points": round(100 * gap, 3)}, indent=2))


if __name__ == "__main__":
    main()
