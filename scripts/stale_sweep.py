"""Sweeps scripts/stale_dni.py over models, cuts, staleness K, variants and seeds, two runs at a
time (each one thread, nice 10), and writes a markdown table of test accuracy per K (issue 22).
A run whose JSON already exists is not run again, so a sweep can be stopped and resumed.

    python scripts/stale_sweep.py --out runs/stale --models ln-tanh --Ks 0,1,2,3,4,8 \\
        --variants "none=;gate=--gate cos" --seeds 0,1 --epochs 2 --table docs/results/t.md
    python scripts/stale_sweep.py --out runs/stale --plot runs/stale/a.json runs/stale/b.json \\
        --png docs/results/staleness_diag.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "stale_dni.py"


def run_name(model: str, cut: str, variant: str, k: str, seed: int, epochs: int) -> str:
    return f"{model}_{cut}_{variant}_K{k.replace(',', '-')}_s{seed}_e{epochs}"


def run_one(out: Path, name: str, flags: list[str]) -> str:
    target = out / f"{name}.json"
    if target.exists():
        return f"{name}: kept"
    cmd = [sys.executable, str(SCRIPT), *flags, "--out", str(target)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    (out / f"{name}.log").write_text(done.stdout + done.stderr)
    tail = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    return f"{name}: {tail if done.returncode == 0 else 'FAILED ' + done.stderr[-300:]}"


def parse_variants(text: str) -> dict[str, list[str]]:
    """'none=;gate=--gate cos' -> {'none': [], 'gate': ['--gate', 'cos']}"""
    variants = {}
    for part in text.split(";"):
        name, _, flags = part.partition("=")
        variants[name.strip()] = flags.split()
    return variants


def sweep(args: argparse.Namespace) -> list[tuple[str, str, str, str, int]]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = parse_variants(args.variants)
    jobs, keys = [], []
    for model, cut, (vname, vflags), k, seed in itertools.product(
            args.models.split(","), args.cuts.split(","), variants.items(),
            args.Ks.split(";") if ";" in args.Ks else args.Ks.split(","),
            [int(s) for s in args.seeds.split(",")]):
        name = run_name(model, cut, vname, k, seed, args.epochs)
        flags = ["--model", model, "--cut", cut, "--K", k, "--seed", str(seed),
                 "--epochs", str(args.epochs), "--diag-every", str(args.diag_every), *vflags,
                 *args.extra.split()]
        jobs.append((name, flags))
        keys.append((model, cut, vname, k, seed))
    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(lambda j: run_one(out, *j), jobs):
            print(line, flush=True)
    return keys


def table(args: argparse.Namespace, keys: list[tuple[str, str, str, str, int]]) -> str:
    """Rows model/cut/variant, columns K; a cell is the mean test accuracy over seeds, in %,
    with each seed's value in brackets when there are several."""
    out = Path(args.out)
    ks = list(dict.fromkeys(k for *_, k, _ in keys))
    rows: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for model, cut, vname, k, seed in keys:
        path = out / f"{run_name(model, cut, vname, k, seed, args.epochs)}.json"
        if path.exists():
            acc = 100 * json.loads(path.read_text())["test_acc"]
            rows.setdefault((model, cut, vname), {}).setdefault(k, []).append(acc)
    lines = ["| model | cut | variant | " + " | ".join(f"K={k}" for k in ks) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in ks) + " |"]
    for (model, cut, vname), cells in rows.items():
        text = []
        for k in ks:
            vals = cells.get(k, [])
            if not vals:
                text.append("")
            elif len(vals) == 1:
                text.append(f"{vals[0]:.1f}")
            else:
                text.append(f"{statistics.mean(vals):.1f} ({', '.join(f'{v:.1f}' for v in vals)})")
        lines.append(f"| {model} | {cut} | {vname} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def plot(paths: list[str], png: str) -> None:
    """Per boundary over training: cosine of g_syn with the true gradient, |g_syn|/|g_true|, and
    the std of the activation M reads; one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(Path(p).read_text()) for p in paths]
    nb = len(runs[0]["diag"][0]["bounds"])
    fig, axes = plt.subplots(3, nb, figsize=(5 * nb, 9), squeeze=False)
    for run in runs:
        c = run["config"]
        label = f"K={c['K']}" + (f" {c['remedy']}" if c.get("remedy", "none") != "none" else "") \
            + (f" gate={c['gate']}" if c.get("gate", "none") != "none" else "")
        its = [d["it"] for d in run["diag"]]
        for b in range(nb):
            rows = [d["bounds"][b] for d in run["diag"]]
            axes[0][b].plot(its, [r["cos"] for r in rows], label=label)
            axes[1][b].semilogy(its, [max(r["norm_ratio"], 1e-3) for r in rows], label=label)
            axes[2][b].semilogy(its, [r["h_std"] for r in rows], label=label)
    for b in range(nb):
        axes[0][b].set_title(f"boundary after stage {b + 1}: cos(g_syn, g_true)")
        axes[1][b].set_title("|g_syn| / |g_true|")
        axes[2][b].set_title("per-sample std of h (what M reads)")
        axes[2][b].set_xlabel("iteration")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/stale", help="folder of the runs' JSON and logs")
    p.add_argument("--models", default="ln-tanh")
    p.add_argument("--cuts", default="zdni")
    p.add_argument("--Ks", default="0,1,2,3,4", help="comma list; ';' list for per-boundary K")
    p.add_argument("--variants", default="none=", help="name=flags;name=flags")
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--diag-every", type=int, default=50)
    p.add_argument("--extra", default="", help="flags added to every run")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--table", default=None, help="write the markdown table here (else print)")
    p.add_argument("--plot", nargs="*", default=None, help="run JSONs to plot instead of sweeping")
    p.add_argument("--png", default="staleness_diag.png")
    args = p.parse_args()
    if args.plot:
        plot(args.plot, args.png)
        return
    text = table(args, sweep(args))
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
