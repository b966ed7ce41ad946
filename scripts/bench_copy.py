"""The DNI paper's Copy and Repeat Copy experiments, in process: the longest sequence solved by
truncated BPTT and by DNI at truncation T, same budget of iterations (zdni/recurrent.py,
zdni/sequence.py). Repeat Copy here repeats the sequence --repeats times (fixed; the curriculum
lengthens the sequence).

    python scripts/bench_copy.py --T 3 --iterations 3000 --seeds 0,1 --out docs/bench/copy.json
    python scripts/bench_copy.py --task repeat --repeats 2 --T 3 --iterations 3000 --out r.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zdni.optim import Updater  # noqa: E402
from zdni.optimspec import OptimSpec  # noqa: E402
from zdni.recurrent import RecurrentNet, StateSynthesizer, train_sequence  # noqa: E402
from zdni.sequence import Curriculum, bit_errors, copy_batch, repeat_copy_batch  # noqa: E402


def run(mode: str, T: int, iterations: int, seed: int, hidden: int, batch: int,
        cell: str = "lstm", repeats: int = 0) -> dict:
    """repeats 0: Copy; else Repeat Copy with that many repeats."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = RecurrentNet(10, hidden, 9, cell)
    opt = Updater(OptimSpec(lr=1e-3), net.parameters())
    synth = StateSynthesizer(hidden, parts=net.parts) if mode == "dni" else None
    synth_opt = Updater(OptimSpec(lr=1e-4), synth.parameters()) if synth else None
    cur = Curriculum()
    start = time.monotonic()
    for _ in range(iterations):
        x, y, mask = repeat_copy_batch(batch, cur.length, repeats, generator=g) if repeats \
            else copy_batch(batch, cur.length, generator=g)
        train_sequence(net, x, y, mask, T, mode, synth, opt, synth_opt)
        with torch.no_grad():
            logits, _ = net.chunk(x, net.zero_state(batch))
        cur.observe(bit_errors(logits, y, mask))
    return {"task": f"repeat-copy x{repeats}" if repeats else "copy", "mode": mode, "T": T,
            "seed": seed, "iterations": iterations, "cell": cell,
            "longest_solved": cur.best_solved, "wall_s": round(time.monotonic() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=int, nargs="+", default=[3])
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cell", default="lstm", choices=["lstm", "gru"])
    parser.add_argument("--task", default="copy", choices=["copy", "repeat"])
    parser.add_argument("--repeats", type=int, default=2, help="Repeat Copy's repeats")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for T in args.T:
        for seed in args.seeds.split(","):
            for mode in ("bptt", "dni"):
                rows.append(run(mode, T, args.iterations, int(seed), args.hidden, args.batch,
                                args.cell, args.repeats if args.task == "repeat" else 0))
                print(json.dumps(rows[-1]), flush=True)
                if args.out:  # after every run: a long table survives an interruption
                    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
