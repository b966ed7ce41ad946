"""The window table: ordinary MLPs trained with DNI at one batch in flight and at more, on MNIST,
distributed (3 worker processes, `zdni train`) or in the in-process oracle (--inproc).

Rows are the models of docs/RESULTS.md's window table (examples/my_models.py:plain_mlp and the
zoo's fcn3); columns the windows; each cell the final test accuracy, mean over seeds. Writes the
raw runs to --json and prints a markdown table.

    python scripts/bench_window.py --data-dir ../shared/data/mnist --windows 1,4 --seeds 0,1
    python scripts/bench_window.py --inproc --rows ln-tanh --windows 1,2,3,4 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MLP = str(ROOT / "examples" / "my_models.py") + ":plain_mlp"

# name: (what the table calls it, zdni train arguments)
ROWS: dict[str, tuple[str, list[str]]] = {
    "ln-tanh": ("LayerNorm + tanh, one unit per layer", ["--model", MLP, "--conditioned"]),
    "ln-tanh-2": ("the same with 2 stages", ["--model", MLP, "--conditioned", "--stages", "2"]),
    "ln-relu": ("LayerNorm + ReLU, one unit per layer",
                ["--model", MLP, "--model-arg", 'act="relu"', "--conditioned"]),
    "tanh": ("tanh without LayerNorm, one unit per layer",
             ["--model", MLP, "--model-arg", "norm=null", "--conditioned"]),
    "ln-tanh-blocks": ("LayerNorm + tanh grouped into blocks",
                       ["--model", MLP, "--model-arg", "blocks=true", "--conditioned"]),
    "fcn3-sg": ("zoo fcn3 (BatchNorm + ReLU blocks), plain sg", ["--model", "fcn3"]),
}


def zdni() -> list[str]:
    return [sys.executable, "-m", "zdni.cli"]


def run(row: str, window: int | None, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """One training; its summary's numbers."""
    cmd = [*zdni(), "train", *ROWS[row][1], "--mode", "sg", "--epochs", str(args.epochs),
           "--seed", str(seed), "--data-dir", args.data_dir, "--quiet", "--out", str(out),
           *(["--max-inflight", str(window)] if window is not None else []),
           *(["--inproc"] if args.inproc else []), *args.extra]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:], "cmd": cmd}
    summary = json.loads((out / "summary.json").read_text())
    return {"accuracy": summary["test_accuracy"], "best": summary.get("best_accuracy"),
            "history": [h["test_accuracy"] for h in summary["history"]],
            "window": summary.get("max_inflight"), "samples_per_s": summary.get("samples_per_s"),
            "wall_s": round(time.monotonic() - start, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--rows", default=",".join(ROWS), help=f"of {', '.join(ROWS)}")
    parser.add_argument("--windows", default="1,default",
                        help="comma-separated; 'default' leaves --max-inflight unset")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--inproc", action="store_true", help="the in-process oracle")
    parser.add_argument("--json", default=None, help="append every run here (JSON lines)")
    parser.add_argument("extra", nargs="*", help="more zdni train arguments, after --")
    args = parser.parse_args()
    unknown = sorted(set(args.rows.split(",")) - set(ROWS))
    if unknown:
        parser.error(f"--rows {unknown[0]}: not a row; rows: {', '.join(ROWS)}")
    windows = [None if w == "default" else int(w) for w in args.windows.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    table: dict[tuple[str, int | None], list[float]] = {}
    print(f"# load {os.getloadavg()[0]:.1f}, {'in process' if args.inproc else 'distributed'}, "
          f"{args.epochs} epochs, seeds {seeds}", flush=True)
    with tempfile.TemporaryDirectory(prefix="zdni-window-") as tmp:
        for row in args.rows.split(","):
            for window in windows:
                for seed in seeds:
                    out = Path(tmp) / f"{row}-{window}-{seed}"
                    got = run(row, window, seed, args, out)
                    got |= {"row": row, "asked_window": window, "seed": seed,
                            "inproc": args.inproc, "extra": args.extra}
                    print(json.dumps(got), flush=True)
                    if args.json:
                        with open(args.json, "a") as fh:
                            fh.write(json.dumps(got) + "\n")
                    if "accuracy" in got:
                        table.setdefault((row, window), []).append(got["accuracy"])
    names = ["default" if w is None else str(w) for w in windows]
    print("\n| model | " + " | ".join(f"window {n}" for n in names) + " |")
    print("| --- |" + " --- |" * len(windows))
    for row in args.rows.split(","):
        cells = []
        for window in windows:
            accs = table.get((row, window), [])
            cells.append(" / ".join(f"{100 * a:.1f}" for a in accs) or "-")
        print(f"| {ROWS[row][0]} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
