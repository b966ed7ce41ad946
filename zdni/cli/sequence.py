"""`zdni sequence`: a recurrent network trained in one process by truncated BPTT or DNI."""

from __future__ import annotations

from typing import Any

import click

from zdni.cli.group import main
from zdni.cli.options import clean_errors, option, writable_dir
from zdni.cli.recipe import optimizer_options


@main.command()
@option("--task", type=click.Choice(["copy", "repeat-copy", "text"]), default=None,
        help="The DNI paper's Copy or Repeat Copy (with its curriculum), or language "
             "modelling on --dataset [default: text with --dataset, else copy].")
@option("--dataset", default=None, type=click.Path(dir_okay=False),
        help="A UTF-8 text file: a character-level language model, bits per character on its "
             "last tenth.")
@option("--mode", type=click.Choice(["bptt", "dni"]), default="dni", show_default=True,
        help="Truncated BPTT, or DNI (a synthetic gradient at every chunk's end).")
@option("-T", "--truncation", "T", type=click.IntRange(1), default=3, show_default=True,
        help="Steps per chunk.")
@option("--cell", type=click.Choice(["lstm", "gru"]), default="lstm", show_default=True)
@option("--hidden", type=click.IntRange(1), default=64, show_default=True)
@option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@option("--iterations", type=click.IntRange(1), default=2000, show_default=True,
        help="Batches of sequences (Copy) or windows of text.")
@option("--lr", type=float, default=1e-3, show_default=True)
@option("--synth-lr", type=float, default=1e-4, show_default=True, help="M's learning rate.")
@optimizer_options
@option("--seed", type=int, default=0, show_default=True)
@option("--eval-every", type=click.IntRange(1), default=100, show_default=True,
        help="Iterations between records (and test passes over the text).")
@option("--out", "out_dir", default=None,
        help="Directory for metrics.jsonl (for `zdni report`).")
@option("--quiet", is_flag=True, help="No record lines.")
@clean_errors
def sequence(task: str | None, dataset: str | None, mode: str, T: int, cell: str, hidden: int,
             batch_size: int, iterations: int, lr: float, synth_lr: float, seed: int,
             eval_every: int, out_dir: str | None, quiet: bool, **recipe: Any) -> None:
    """Train a recurrent network in chunks of T steps, by truncated BPTT or DNI (in process),
    with the optimizer, schedule and clipping given (M's: --synth-lr, --synth-optim)."""
    from zdni.seqrun import SeqConfig, train_sequence_run

    if out_dir:
        writable_dir(out_dir)
    cfg = SeqConfig(task=task or ("text" if dataset else "copy"), dataset=dataset, mode=mode,
                    T=T, cell=cell, hidden=hidden, batch_size=batch_size, iterations=iterations,
                    lr=lr, synth_lr=synth_lr, seed=seed, eval_every=eval_every, **recipe)
    done = train_sequence_run(cfg, out_dir, quiet)
    result = f"bits per character {done['bpc']:.3f}" if "bpc" in done else \
        f"longest length solved {done['solved']} (now training on {done['length']})"
    click.echo(f"{cfg.task} {mode} T={T} {cell}: {result} after {done['iteration']} "
               f"iterations, {done['wall_s']:.1f} s")
