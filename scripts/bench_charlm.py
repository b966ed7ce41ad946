"""Character-level language modelling on a text file, truncated BPTT against DNI at the same T
(zdni/recurrent.py, zdni/sequence.py): test bits per character against updates and wall time.

Each method reads the training text as `--batch` contiguous streams, `--window` characters at a
time, carrying its state across windows; it updates after every chunk of T characters (as a DNI
layer does). BPTT drops the gradient from beyond each chunk; DNI adds M's prediction of it at
every chunk's end (the last chunk of a window too: the text goes on), M trained on the
bootstrapped targets the next chunk sends back. Same network, seed, data order and updates.

    cat README.md docs/*.md > /tmp/corpus.txt
    python scripts/bench_charlm.py --dataset /tmp/corpus.txt --T 2 4 8 --epochs 2 \
        --out docs/bench/charlm.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zdni.optim import Updater  # noqa: E402
from zdni.optimspec import OptimSpec  # noqa: E402
from zdni.recurrent import RecurrentNet, StateSynthesizer, char_loss, train_sequence  # noqa: E402
from zdni.sequence import Corpus, bits_per_char  # noqa: E402


def run(corpus: Corpus, mode: str, T: int, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    net = RecurrentNet(corpus.size, args.hidden, corpus.size, args.cell)
    opt = Updater(OptimSpec(lr=args.lr), net.parameters())
    synth = StateSynthesizer(args.hidden, parts=net.parts) if mode == "dni" else None
    synth_opt = Updater(OptimSpec(lr=args.synth_lr), synth.parameters()) if synth else None
    window = T * max(1, args.window // T)
    curve = [(0, 0.0, round(bits_per_char(net, corpus), 4))]
    start, updates = time.monotonic(), 0
    for _ in range(args.epochs):
        state = net.zero_state(args.batch)
        for x, y, mask in corpus.streams(corpus.train, args.batch, window):
            state = train_sequence(net, x, y, mask, T, mode, synth, opt, synth_opt,
                                   loss_fn=char_loss, state=state, goes_on=True)["state"]
            before, updates = updates, updates + window // T
            if updates // args.eval_every > before // args.eval_every:
                curve.append((updates, round(time.monotonic() - start, 1),
                              round(bits_per_char(net, corpus), 4)))
    curve.append((updates, round(time.monotonic() - start, 1), round(bits_per_char(net, corpus), 4)))
    return {"mode": mode, "T": T, "seed": seed, "cell": args.cell, "hidden": args.hidden,
            "updates": updates, "wall_s": curve[-1][1], "final_bpc": curve[-1][2],
            "best_bpc": min(c[2] for c in curve), "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="a UTF-8 text file")
    parser.add_argument("--T", type=int, nargs="+", default=[4])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--cell", default="lstm", choices=["lstm", "gru"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--window", type=int, default=64, help="characters per window")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--synth-lr", type=float, default=1e-5)
    parser.add_argument("--eval-every", type=int, default=500, help="updates between tests")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    corpus = Corpus.from_file(args.dataset)
    print(f"# {args.dataset}: {len(corpus.train):,} training and {len(corpus.test):,} test "
          f"characters, vocabulary {corpus.size}", flush=True)
    rows: list[dict[str, Any]] = []
    for T in args.T:
        for seed in (int(s) for s in args.seeds.split(",")):
            for mode in ("bptt", "dni"):
                rows.append(run(corpus, mode, T, args, seed))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps({"dataset": args.dataset,
                                                          "args": vars(args), "rows": rows},
                                                         indent=1))
    print("| T | seed | BPTT bits/char | DNI bits/char |\n| --- | --- | --- | --- |")
    for T in args.T:
        for seed in (int(s) for s in args.seeds.split(",")):
            got = {r["mode"]: r for r in rows if r["T"] == T and r["seed"] == seed}
            print(f"| {T} | {seed} | {got['bptt']['final_bpc']:.3f} | {got['dni']['final_bpc']:.3f} |")


if __name__ == "__main__":
    main()
