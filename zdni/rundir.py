"""A run directory (RUN_DIR, runs/RUN_ID by default): what a run leaves there, the refusal to
start a new run over one, and closing it when the run ends, however it ends.

    summary.json, metrics.jsonl, logs/  the run's record
    model.pt, model.json                the trained network (zdni/modelfile.py)
    checkpoint/                         what `zdni train --resume RUN_DIR` goes on from
                                        (zdni/resume.py)
    run.json                            where its Redis and broker are while it runs; its
                                        outcome (finished, failed, interrupted, stopped) once
                                        it ended
    redis/                              the embedded Redis's append-only journal while it runs;
                                        removed when the run ends with model.pt and checkpoint/
                                        written (everything worth keeping is in them);
                                        --keep-redis keeps it for inspection
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

from torch import nn

from zdni import modelfile, resume
from zdni.config import ConfigError, RunConfig
from zdni.data import Normalization

__all__ = ["RUN_FILE", "RunIdTaken", "closing", "describe", "read_outcome", "refuse_reuse"]

log = logging.getLogger("zdni.driver")

RUN_FILE = "run.json"
JOURNAL = "redis"
HOLDS = (RUN_FILE, "summary.json", "metrics.jsonl", modelfile.MODEL_FILE, resume.CHECKPOINT_DIR)


class RunIdTaken(ConfigError):
    """A new run would take the id of a run its Redis holds: refused before the run starts, so
    its run directory is left as it was (no run.json saying a run failed there)."""


def refuse_reuse(out_dir: str) -> None:
    """A ConfigError when `out_dir` already holds a run: a new run there would overwrite it."""
    found = [name for name in HOLDS if os.path.exists(os.path.join(out_dir, name))]
    if found:
        raise ConfigError(f"{out_dir} already holds a run ({', '.join(found)}): continue it "
                          f"with `zdni train --resume {out_dir}`, or give another --run-id "
                          "or --out")


def journal(out_dir: str | None) -> str | None:
    """Where the embedded Redis of a run in `out_dir` keeps its append-only file."""
    return os.path.join(out_dir, JOURNAL) if out_dir else None


def _clear_leftovers(out_dir: str) -> None:
    """A fresh run in a directory an unfinished attempt left (`zdni experiment` runs again
    what did not finish): its checkpoint, model and journal would be taken for this run's."""
    for name in (resume.CHECKPOINT_DIR, JOURNAL, modelfile.MODEL_FILE, modelfile.INFO_FILE):
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def update_run_file(out_dir: str, **fields: Any) -> None:
    """Merge fields into RUN_DIR/run.json (written by zdni.cluster at start; created here for
    in-process runs)."""
    path = os.path.join(out_dir, RUN_FILE)
    found: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        with open(path) as fh:
            found = json.load(fh)
    os.makedirs(out_dir, exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump({**found, **fields}, fh, indent=2)
    os.replace(path + ".tmp", path)


@contextlib.contextmanager
def closing(out_dir: str | None, cfg: RunConfig, norm: Normalization | None,
            live: nn.Module | None = None, resumed: bool = False,
            keep_redis: bool = False) -> Iterator[None]:
    """The block runs the run; then, whatever happened, model.pt is written from the latest
    checkpoint, the journal removed and run.json given the outcome. A fresh run first clears
    what an earlier attempt left (the command line refuses such a directory before this)."""
    if out_dir is None:
        yield
        return
    if not resumed:
        _clear_leftovers(out_dir)
    outcome: str | None = "failed"
    try:
        yield
        outcome = "finished"
    except RunIdTaken:
        outcome = None  # refused before it started: nothing of it to close
        with contextlib.suppress(OSError):
            os.rmdir(out_dir)  # only when empty: a directory this attempt made
        raise
    except BaseException as exc:  # Ctrl-C, a stop asked for (StopRequested.outcome), an error
        outcome = getattr(exc, "outcome", "interrupted" if isinstance(exc, KeyboardInterrupt)
                          else "failed")
        raise
    finally:
        if outcome is not None:
            _close(out_dir, cfg, norm, live, outcome, keep_redis)


def _close(out_dir: str, cfg: RunConfig, norm: Normalization | None, live: nn.Module | None,
           outcome: str, keep_redis: bool) -> None:
    fields: dict[str, Any] = {"run_id": cfg.run_id, "status": outcome, "ended": time.time()}
    try:
        if resume.exists(out_dir):
            found = resume.read(out_dir)
            info = modelfile.describe(cfg, norm, modelfile.unit_names(cfg, live))
            best = found.best_states(out_dir) if cfg.keep_best else None
            if best is not None and found.best is not None:  # the best epoch, not the last
                at = {k: found.best[k] for k in ("iteration", "epoch", "test_accuracy")}
            else:
                best = found.states
                at = {"iteration": found.iteration, "epoch": found.loop.epoch,
                      "test_accuracy": found.loop.accuracy if found.loop.position == 0 else None}
            fields["model"] = modelfile.write(out_dir, info, best, **at)
    except Exception as exc:  # noqa: BLE001 - the run's own outcome (or error) comes first
        log.error("[driver] could not write %s: %s", modelfile.MODEL_FILE, exc)
    where = journal(out_dir)
    if where and os.path.isdir(where) and "model" in fields and not keep_redis:
        shutil.rmtree(where, ignore_errors=True)  # the model and checkpoint hold what counts
        fields["redis"] = "journal removed (--keep-redis keeps it)"
    update_run_file(out_dir, **fields)


def read_outcome(run_dir: str) -> str | None:
    """How the run in `run_dir` ended (finished, failed, interrupted), None while it runs."""
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(run_dir, RUN_FILE)) as fh:
            status = json.load(fh).get("status")
            return status if isinstance(status, str) else None
    return None


def describe(run_dir: str) -> dict[str, Any]:
    """An ended run's state from its files: outcome, summary (when it finished), checkpoint."""
    info: dict[str, Any] = {"run_dir": run_dir, "status": read_outcome(run_dir)}
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(run_dir, "summary.json")) as fh:
            info["summary"] = json.load(fh)
    if resume.exists(run_dir):
        with contextlib.suppress(resume.ResumeError):
            info["checkpoint"] = resume.loop_summary(resume.read(run_dir))
    model = os.path.join(run_dir, modelfile.MODEL_FILE)
    info["model"] = model if os.path.isfile(model) else None
    return info


def render(info: dict[str, Any]) -> str:
    """describe()'s answer for the terminal."""
    lines = []
    summary, ckpt = info.get("summary"), info.get("checkpoint")
    if info["status"] == "finished" and summary:
        m, on = summary.get("metric", "accuracy"), summary.get("best_on", "test")
        lines.append(f"run {summary['run_id']}: finished, {summary['epochs']} epochs, "
                     f"{summary['iterations']} iterations in {summary['wall_s']:.0f} s; test "
                     f"{m} {_num(summary.get(f'test_{m}'))} (best {on} {m} "
                     f"{_num(summary.get(f'best_{on}_{m}', summary.get('best_test_accuracy')))}"
                     f", epoch {summary.get('best_epoch', '?')})")
        for row in summary.get("history", []):
            scores = ", ".join(f"{k.replace('_', ' ')} {_num(v)}" for k, v in row.items()
                               if k.startswith(("val_", "test_")))
            lines.append(f"  epoch {row['epoch']:>3}: train loss {row['train_loss'] or 0:.4f}, "
                         f"{scores}")
    else:
        lines.append(f"run in {info['run_dir']}: {info['status'] or 'not running'}")
    if ckpt:
        lines.append(f"checkpoint: iteration {ckpt['iteration']}, epoch {ckpt['epoch'] + 1} "
                     f"of {ckpt['epochs']} at batch {ckpt['position']}"
                     if ckpt["position"] else
                     f"checkpoint: iteration {ckpt['iteration']}, after epoch {ckpt['epoch']} "
                     f"of {ckpt['epochs']}")
        lines.append(f"continue: zdni train --resume {info['run_dir']}"
                     + (" --epochs N" if ckpt["epoch"] >= ckpt["epochs"] else ""))
    lines.append(f"model: {info['model'] or 'none'}")
    return "\n".join(lines)


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"
