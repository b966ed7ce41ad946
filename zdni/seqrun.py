"""A recurrent run in one process (`zdni sequence`): Copy or Repeat Copy with the curriculum, or
character-level language modelling on a text file, by truncated BPTT or DNI in chunks of T
steps (zdni/recurrent.py); its records go to OUT/metrics.jsonl for `zdni report`.

The network and M update by the run's recipe, as a pipeline's stages and synthesizers do
(zdni/optim.py: the optimizer, its schedule and clipping; M's from synth_lr and synth_optim).
An iteration (a batch of sequences, or a window of text) is one unit of the schedule, however
many chunks it has; by epoch, an epoch is a pass over the text (Copy has no epochs).

Records: 'start' (runner "sequence" and the settings), 'seq' every `eval_every` iterations
(iteration, wall_s, loss, lr: the network's learning rate of the next update; the curriculum's
current length and the longest solved, or the test part's bits per character), then 'done'
with the same fields at the end.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from zdni.errors import ZdniError
from zdni.optim import Updater, make_updater
from zdni.optimspec import check, stage_spec, synth_spec
from zdni.recurrent import CELLS, RecurrentNet, StateSynthesizer, char_loss, train_sequence
from zdni.sequence import (
    Corpus,
    Curriculum,
    bit_errors,
    bits_per_char,
    copy_batch,
    repeat_copy_batch,
)

__all__ = ["SeqConfig", "TASKS", "train_sequence_run"]

TASKS = ("copy", "repeat-copy", "text")
MODES = ("bptt", "dni")


class SeqConfigError(ZdniError, ValueError):
    """A sequence run's setting is out of range; the message names it."""


@dataclass
class SeqConfig:
    """A recurrent run's settings (the paper's Copy: LSTM of 256, batch 256; smaller here)."""

    task: str = "copy"
    dataset: str | None = None  # the text file of task "text"
    mode: str = "dni"
    T: int = 3  # truncation: steps per chunk
    cell: str = "lstm"
    hidden: int = 64
    batch_size: int = 32
    iterations: int = 2000  # sequences (Copy) or windows of text (each window `window` chars)
    window: int = 64
    lr: float = 1e-3
    synth_lr: float = 1e-4  # M's
    seed: int = 0
    eval_every: int = 100
    bits: int = 8
    repeats: int = 2  # Repeat Copy's repeat count
    # The recipe, as a pipeline run's (zdni/optimspec.py says what each one does).
    optimizer: str = "adam"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup: int = 0
    lr_step_size: int = 1
    lr_gamma: float = 0.1
    lr_min: float = 0.0
    schedule_by: str = "iteration"  # epoch: a pass over the text
    clip_norm: float = 0.0
    synth_optim: dict[str, Any] = field(default_factory=dict)  # M: overrides of the above
    epoch_batches: int = 0  # windows per pass over the text, set from it (0: Copy, no epochs)

    @property
    def max_iterations(self) -> int:
        return self.iterations

    @property
    def epochs(self) -> int:
        """Passes over the text the iterations begin (1 for Copy)."""
        return math.ceil(self.iterations / self.epoch_batches) if self.epoch_batches else 1

    def validate(self) -> SeqConfig:
        if self.task not in TASKS:
            raise SeqConfigError(f"task {self.task!r}: expected one of {', '.join(TASKS)}")
        if (self.task == "text") != (self.dataset is not None):
            raise SeqConfigError("task text needs --dataset FILE.txt (and only it takes one)")
        if self.mode not in MODES:
            raise SeqConfigError(f"mode {self.mode!r}: expected bptt or dni")
        if self.cell not in CELLS:
            raise SeqConfigError(f"cell {self.cell!r}: expected one of {', '.join(CELLS)}")
        for name in ("T", "hidden", "batch_size", "iterations", "window", "eval_every", "bits",
                     "repeats"):
            if getattr(self, name) < 1:
                raise SeqConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        check(self)
        if self.task != "text" and "epoch" in (stage_spec(self).schedule_by,
                                               synth_spec(self).schedule_by):
            raise SeqConfigError(f"task {self.task} has no epochs: schedule by iteration")
        return self


def train_sequence_run(cfg: SeqConfig, out_dir: str | None = None,
                       quiet: bool = True) -> dict[str, Any]:
    """Train as `cfg` says; returns the final record (and writes every record under out_dir)."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    corpus = Corpus.from_file(cfg.dataset) if cfg.dataset is not None else None
    inputs = corpus.size if corpus else cfg.bits + 2
    outputs = corpus.size if corpus else cfg.bits + 1
    net = RecurrentNet(inputs, cfg.hidden, outputs, cfg.cell)
    synth = StateSynthesizer(cfg.hidden, parts=net.parts) if cfg.mode == "dni" else None
    if corpus is not None:
        cfg.epoch_batches = corpus.windows(corpus.train, cfg.batch_size, _window(cfg))
    opt, synth_opt = updaters(cfg, net, synth)
    log = _Log(out_dir, {"kind": "start", "runner": "sequence", "config": asdict(cfg),
                         "time": time.time()})
    curriculum = Curriculum()
    start = time.monotonic()
    losses: list[float] = []
    windows = _text_windows(corpus, cfg) if corpus else None
    state = net.zero_state(cfg.batch_size) if corpus else None
    record: dict[str, Any] = {}
    for it in range(1, cfg.iterations + 1):
        if corpus is not None:
            assert windows is not None
            fresh, (x, y, mask) = next(windows)
            state = net.zero_state(cfg.batch_size) if fresh else state
            out = train_sequence(net, x, y, mask, cfg.T, cfg.mode, synth, opt, synth_opt,
                                 loss_fn=char_loss, state=state, goes_on=True)
            state = out["state"]
        else:
            if cfg.task == "copy":
                x, y, mask = copy_batch(cfg.batch_size, curriculum.length, cfg.bits, gen)
            else:
                x, y, mask = repeat_copy_batch(cfg.batch_size, curriculum.length, cfg.repeats,
                                               cfg.bits, generator=gen)
            out = train_sequence(net, x, y, mask, cfg.T, cfg.mode, synth, opt, synth_opt)
            with torch.no_grad():
                logits, _ = net.chunk(x, net.zero_state(cfg.batch_size))
            curriculum.observe(bit_errors(logits, y, mask))
        losses.append(out["loss"])
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            record = {"kind": "seq", "iteration": it, "wall_s": round(time.monotonic() - start, 3),
                      "loss": sum(losses) / len(losses), "synth_loss": out["synth_loss"],
                      "lr": opt.lr}
            losses = []
            if corpus is not None:
                record["bpc"] = round(bits_per_char(net, corpus), 4)
            else:
                record |= {"length": curriculum.length, "solved": curriculum.best_solved}
            log.write(record)
            if not quiet:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in record.items() if k != "kind"), flush=True)
    done = {**record, "kind": "done"}
    log.write(done)
    log.close()
    return done


def updaters(cfg: SeqConfig, net: torch.nn.Module, synth: torch.nn.Module | None
             ) -> tuple[Updater, Updater | None]:
    """The network's and M's updaters, by the run's recipe (the stages' and M's of a pipeline)."""
    return (make_updater(stage_spec(cfg), list(net.parameters()), cfg),
            make_updater(synth_spec(cfg), list(synth.parameters()), cfg) if synth else None)


def _window(cfg: SeqConfig) -> int:
    """Characters per window of text: a whole number of chunks."""
    return cfg.T * max(1, cfg.window // cfg.T)


def _text_windows(corpus: Corpus, cfg: SeqConfig) -> Any:
    """(starts a new pass over the text, window) forever: the state resets at each pass."""
    while True:
        fresh = True
        for batch in corpus.streams(corpus.train, cfg.batch_size, _window(cfg)):
            yield fresh, batch
            fresh = False


class _Log:
    """JSON lines under out_dir/metrics.jsonl (nowhere without out_dir)."""

    def __init__(self, out_dir: str | None, first: dict[str, Any]) -> None:
        self.fh = None
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            self.fh = open(os.path.join(out_dir, "metrics.jsonl"), "w")  # noqa: SIM115
        self.write(first)

    def write(self, record: dict[str, Any]) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
