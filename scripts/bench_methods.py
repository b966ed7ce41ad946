"""The decoupling methods' table: the runs of `zdni experiment methods` (every --mode, and
cDNI, on fcn3/MNIST, 3 stages, each at its method's default window; backprop at one) with one
seed, evaluated at each epoch's end only, distributed (a broker and a worker process per stage,
as `zdni train`) or in one process (--inproc).

Each row: the window, the test accuracy after the epochs, and the training's samples/s and wall
time (the summary's: evaluation included, start-up and shut-down not). The machine's load
(`uptime`) before and after goes above the table: timings on a loaded machine are not speeds.
Writes the raw numbers to --json and prints a markdown table.

    nice -n 10 python scripts/bench_methods.py --data-dir ../shared/data/mnist --epochs 1
    python scripts/bench_methods.py --methods backprop,pipedream --epochs 3 --seed 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zdni.config import RunConfig
from zdni.experiment import plan, train_one


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run(name: str, cfg: RunConfig, inproc: bool, out: Path) -> dict:
    """One training; its summary's numbers, or the error it ended with."""
    start = time.monotonic()
    try:
        s = train_one(cfg, str(out), inproc, quiet=True)
    except Exception as exc:  # noqa: BLE001 - a failed row is reported, the others go on
        return {"row": name, "error": str(exc).splitlines()[:1]}
    return {"row": name, "mode": s["mode"], "window": s.get("max_inflight"),
            "accuracy": s["test_accuracy"], "history": [h["test_accuracy"] for h in s["history"]],
            "samples_per_s": s["samples_per_s"], "wall_s": s["wall_s"],
            "call_s": round(time.monotonic() - start, 1)}


def table(results: list[dict], epochs: int) -> str:
    lines = [f"| method | in flight | test acc. after {epochs} epoch(s) (%) | samples/s | "
             "training wall (s) |", "|" + " --- |" * 5]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | - | failed: {' '.join(r['error'])} | - | - |")
            continue
        lines.append(f"| {r['row']} | {r['window'] or '-'} | {100 * r['accuracy']:.2f} | "
                     f"{r['samples_per_s']:.0f} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("ZDNI_DATA_DIR", "data"))
    ap.add_argument("--methods", default="",
                    help="comma-separated rows (the suite's variants) [default: all]")
    ap.add_argument("--model", default="", help="another model than the suite's fcn3")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inproc", action="store_true", help="every stage in one process")
    ap.add_argument("--train-limit", type=int, default=None, help="the first N samples: a check")
    ap.add_argument("--json", default="", help="write the raw results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    runs = {name.rsplit("-s", 1)[0]: cfg
            for name, cfg in plan("methods", (args.seed,), args.epochs, args.data_dir)}
    wanted = [r.strip() for r in args.methods.split(",") if r.strip()] or list(runs)
    unknown = sorted(set(wanted) - set(runs))
    if unknown:
        print(f"bench_methods: no row {', '.join(unknown)}; rows: {', '.join(runs)}",
              file=sys.stderr)
        return 2
    before = uptime()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_methods-") as tmp:
        for name in wanted:
            cfg = runs[name]
            cfg.eval_every = 0  # the test set at each epoch's end only: timings of training
            cfg.run_id = f"bench-methods-{name}-{int(time.time())}"
            cfg.train_limit = args.train_limit
            if args.model:
                cfg.model = args.model
            result = run(name, cfg.validate(), args.inproc, Path(tmp) / name)
            print(json.dumps(result), file=sys.stderr, flush=True)
            results.append(result)
    after = uptime()
    cfg = next(iter(runs.values()))
    runner = "in one process (--inproc)" if args.inproc else "distributed"
    print(f"{args.model or cfg.model} on MNIST, {cfg.stages} stages, batch {cfg.batch_size}, "
          f"{args.epochs} epoch(s), seed {args.seed}, {runner}.\n"
          f"Load before: {before}\nLoad after:  {after}\n")
    print(table(results, args.epochs))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "uptime_before": before,
                                               "uptime_after": after, "results": results},
                                              indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
