"""Continuing a run: RUN_DIR/checkpoint/, written while the run trains, read by `--resume`.

A checkpoint is taken with nothing in flight: the runner settles (every batch fed is finished
by every stage, and M and I have trained on every true gradient and input sent to them), then
hands over each stage's zdni.checkpoint.stage_state at the last iteration fed (so whatever a
stage keeps there, weights, M and I, optimizer states, random streams, comes back with it).
Beside them goes the loop's LoopState: the feeder's epoch and position (its order is a pure
function of seed and epoch), iterations and samples so far, wall time, the history and the
epoch's metric sums. One is taken every cfg.checkpoint_every iterations and at every epoch's
end.

    checkpoint/state.json          format, iteration, runner, the run's settings, the loop's
                                   state, and the name of each endpoint's file
    checkpoint/stage-E-F.zckpt     endpoint E's tensors and metadata (zdni.checkpoint's field
                                   format: no pickle), taken after F iterations

The endpoint files are written first and state.json last, replaced in one step, so a run
stopped at any moment leaves a whole checkpoint: the one state.json names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import redis

from zdni import checkpoint, keys
from zdni.codec import decode_state, encode_state
from zdni.config import ConfigError, RunConfig
from zdni.errors import ZdniError
from zdni.loop import LoopState, Runner, State
from zdni.metrics import MetricsWriter
from zdni.optimspec import stretched
from zdni.protocol import MessageError

__all__ = ["CHECKPOINT_DIR", "Checkpoint", "Checkpointer", "ResumeError", "prepare", "read",
           "seed", "write"]

log = logging.getLogger("zdni.driver")

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
FORMAT = 1


class ResumeError(ZdniError, ValueError):
    """A run directory cannot be continued; the message says why and what to do."""


@dataclass
class Checkpoint:
    """A run's latest checkpoint: its settings, the loop's state and every endpoint's state."""

    cfg: RunConfig
    loop: LoopState
    states: dict[int, State]
    iteration: int  # the last iteration every stage had trained (the states' common label)
    runner: str  # "zdni" (distributed) or "inproc"
    best: dict[str, Any] | None = None  # with keep_best: iteration, epoch, test_accuracy, files

    def best_states(self, run_dir: str) -> dict[int, State] | None:
        """The stages' weights at the best epoch so far (keep_best), or None."""
        if not self.best:
            return None
        return {int(e): decode_state(checkpoint.read_file(os.path.join(folder(run_dir), n)))
                for e, n in self.best["files"].items()}


class Checkpointer:
    """The loop's Saver: checkpoints into RUN_DIR/checkpoint/ when due and at epoch ends."""

    def __init__(self, run_dir: str, cfg: RunConfig, resumed: Checkpoint | None = None
                 ) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.every = cfg.checkpoint_every
        self.next = (resumed.loop.fed if resumed else 0) + self.every
        self.best = resumed.best if resumed else None
        self.taken = 0
        self.seconds = 0.0  # spent settling, gathering and writing: what checkpoints cost

    def tally(self) -> dict[str, Any]:
        """For the summary: checkpoints taken and the seconds they took (drains included)."""
        return {"taken": self.taken, "seconds": round(self.seconds, 3)}

    def due(self, fed: int) -> bool:
        return self.every > 0 and fed >= self.next

    def save(self, runner: Runner, state: LoopState, metrics: MetricsWriter) -> None:
        began = time.monotonic()
        try:
            self._save(runner, state, metrics)
        finally:
            self.seconds += time.monotonic() - began

    def _save(self, runner: Runner, state: LoopState, metrics: MetricsWriter) -> None:
        states = runner.snapshot()
        self.next = runner.fed + self.every
        if states is None:  # a stage failed meanwhile; the next interval's checkpoint comes
            log.warning("[driver] no checkpoint at iteration %d: not every stage confirmed "
                        "its backup", runner.fed)
            return
        state.fed = runner.fed
        state.metrics = metrics.state()
        # The epoch just ended is the best so far on the set "best" is chosen on (the
        # validation set when there is one), in the metric's direction (zdni.loop.train).
        if self.cfg.keep_best and state.position == 0 and state.best is not None and int(
                state.best[0]) == state.epoch and (self.best is None
                                                   or self.best["epoch"] != state.epoch):
            self.best = write_best(self.run_dir, state, states)
        write(self.run_dir, self.cfg, state, states, runner.name, self.best)
        self.taken += 1


def write_best(run_dir: str, loop: LoopState, states: dict[int, State]) -> dict[str, Any]:
    """The stages' weights (only) of a new best epoch, beside the checkpoint."""
    os.makedirs(folder(run_dir), exist_ok=True)
    files = {}
    for endpoint, (tensors, meta) in sorted(states.items()):
        name = f"best-{endpoint}-{loop.fed}.zckpt"
        weights = {k: v for k, v in tensors.items() if k.startswith("stage.")}
        checkpoint.write_file(os.path.join(folder(run_dir), name), encode_state(weights, meta))
        files[str(endpoint)] = name
    return {"iteration": loop.fed - 1, "epoch": loop.epoch, "test_accuracy": loop.accuracy,
            "score": loop.best[1] if loop.best else None, "files": files}


def folder(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINT_DIR)


def write(run_dir: str, cfg: RunConfig, loop: LoopState, states: dict[int, State],
          runner: str, best: dict[str, Any] | None = None) -> None:
    """Write every endpoint's state, then state.json naming them (and the best epoch's files,
    with keep_best); drop the files it no longer names."""
    where = folder(run_dir)
    os.makedirs(where, exist_ok=True)
    files = {}
    for endpoint, (tensors, meta) in sorted(states.items()):
        name = f"stage-{endpoint}-{loop.fed}.zckpt"
        checkpoint.write_file(os.path.join(where, name), encode_state(tensors, meta))
        files[str(endpoint)] = name
    record = {"format": FORMAT, "iteration": loop.fed - 1, "runner": runner,
              "written": time.time(), "config": json.loads(cfg.to_json()),
              "loop": dataclasses.asdict(loop), "files": files, "best": best}
    path = os.path.join(where, STATE_FILE)
    with open(path + ".tmp", "w") as fh:
        json.dump(record, fh)
    os.replace(path + ".tmp", path)
    keep = {*files.values(), *(best or {}).get("files", {}).values()}
    for name in os.listdir(where):
        if name.endswith(".zckpt") and name not in keep:
            os.remove(os.path.join(where, name))


def exists(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(folder(run_dir), STATE_FILE))


def read(run_dir: str) -> Checkpoint:
    """The run directory's checkpoint, or a ResumeError saying what is missing or wrong."""
    path = os.path.join(folder(run_dir), STATE_FILE)
    if not os.path.isdir(run_dir):
        raise ResumeError(f"{run_dir}: no such run directory")
    if not os.path.isfile(path):
        raise ResumeError(f"{run_dir}: no {CHECKPOINT_DIR}/{STATE_FILE}; the run stopped before "
                          "its first checkpoint (one is taken every --checkpoint-every "
                          "iterations and at each epoch's end): start it again instead")
    try:
        with open(path) as fh:
            record = json.load(fh)
        if record.get("format") != FORMAT:
            raise ResumeError(f"{path}: checkpoint format {record.get('format')!r}, this zdni "
                              f"reads {FORMAT}")
        cfg = RunConfig.from_dict(record["config"])
        loop = LoopState(**record["loop"])
        states = {}
        for endpoint, name in record["files"].items():
            raw = checkpoint.read_file(os.path.join(folder(run_dir), os.path.basename(name)))
            states[int(endpoint)] = decode_state(raw)
    except ResumeError:
        raise
    except (OSError, ValueError, KeyError, TypeError, ConfigError, MessageError) as exc:
        raise ResumeError(f"{path}: not a readable checkpoint ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:160]})") from None
    return Checkpoint(cfg, loop, states, int(record["iteration"]), str(record["runner"]),
                      record.get("best"))


def prepare(run_dir: str, epochs: int | None = None,
            data_dir: str | None = None) -> Checkpoint:
    """The checkpoint to continue, its settings ready to train on: `epochs` in all (default:
    the run's own; more than it has done), the data from `data_dir` when it moved."""
    found = read(run_dir)
    cfg, done = found.cfg, found.loop.epoch
    wanted = cfg.epochs if epochs is None else epochs
    if wanted <= done:
        more = "" if epochs is not None else f" of {cfg.epochs}"
        raise ResumeError(f"run {cfg.run_id} has trained {done} epochs{more}: give --epochs N "
                          f"with N > {done} to train on")
    longer = stretched(cfg, wanted)
    if longer:
        raise ResumeError(f"run {cfg.run_id}: the cosine schedule of {' and of '.join(longer)} "
                          f"spans its {cfg.epochs} epochs and cannot go on over {wanted}; "
                          f"resume to its own {cfg.epochs} (no --epochs), or start a new run")
    cfg.epochs = wanted
    if data_dir is not None:
        cfg.data_dir = data_dir
    return found


def seed(client: redis.Redis, run: str, found: Checkpoint) -> None:
    """Put the checkpoint's states in Redis as each endpoint's latest backup, where a starting
    worker (or synthesizer service) resumes from."""
    for endpoint, (tensors, meta) in found.states.items():
        checkpoint.save_state(client, run, endpoint, int(meta["it"]), tensors, meta)


def clear_run(client: redis.Redis, run: str) -> None:
    """Delete every key of the run (an earlier attempt's backups, rings, beats, counters)."""
    stale = list(client.scan_iter(match=f"{keys.run_prefix(run)}:*", count=1000))
    for start in range(0, len(stale), 500):
        client.delete(*stale[start : start + 500])


def loop_summary(found: Checkpoint) -> dict[str, Any]:
    """Where the checkpoint stands, in words a status line can use."""
    loop = found.loop
    return {"iteration": found.iteration, "epoch": loop.epoch, "position": loop.position,
            "epochs": found.cfg.epochs, "test_accuracy": loop.accuracy}
