"""Training methods by name: one file per method in this package, defining a Stage subclass
(zdni/stage.py) named in its `METHOD`. Adding a method touches its own file, its test and the
README's table: the file's name is the method's name (`--mode NAME`).

Listing the names reads this folder without importing the methods (the broker, which checks a
run's config, never imports torch); `get` imports the one asked for.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from pathlib import Path
from typing import Any

__all__ = ["build", "default_window", "evaluates_in_stream", "get", "names"]

ORDER = ("backprop", "sg", "full")  # listed first, in this order; others follow by name
DEFAULT_WINDOW = 4  # batches in flight when --max-inflight is not given
# Methods whose accuracy falls with more in flight by default: DNI's M is trained on targets
# W - 1 iterations late; even with the trust gate (zdni/trust.py) an MLP with LayerNorm cut
# after each Linear lost 3.5 points at 4 in flight and 1 point at 2 (docs/RESULTS.md, issue 22).
# Here, not in the methods' files: the broker validates a run's window without importing torch.
SAFE_WINDOWS = {"sg": 2, "full": 2}


@functools.cache
def names() -> tuple[str, ...]:
    """Every method's name: the baseline and DNI's modes first, then the rest by name."""
    found = {m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
             if not m.name.startswith("_")}
    return tuple(n for n in ORDER if n in found) + tuple(sorted(found - set(ORDER)))


@functools.cache
def get(name: str) -> Any:
    """The Stage subclass (zdni.stage.Stage) of method `name`; a ValueError names the methods
    there are. Typed Any: naming Stage here would import torch into the broker's config."""
    if name not in names():
        raise ValueError(f"no training method {name!r}; methods: {', '.join(names())}")
    return importlib.import_module(f"zdni.methods.{name}").METHOD


def default_window(name: str) -> int:
    """Batches in flight for method `name` when the run does not say (--max-inflight)."""
    return SAFE_WINDOWS.get(name, DEFAULT_WINDOW)


def evaluates_in_stream(cfg: Any, stages: int) -> bool:
    """Whether a distributed run may evaluate without draining its window first: every stage
    finishes its update of an iteration on that iteration's input (zdni.stage.Wiring: done_on
    "input", no batch event of its own), so evaluation batches sent after iteration t queue
    behind t's input at every stage (one FIFO path: driver, broker, stage 1, broker, stage 2
    ...) and see exactly the parameters after t, as a drained window would. Not for methods
    that update on a gradient coming back (backprop, pipedream, ddg, fr) or on the driver's
    batch (full DNI's later stages), not with remote synthesizers (a stage then updates when
    the service answers), and not in an ordered run (its segments end where the in-process
    oracle's do: at the drain)."""
    if cfg.ordered or cfg.synth_placement == "remote":
        return False
    method = get(cfg.mode)
    wirings = [method.wiring(i, stages) for i in range(1, stages + 1)]
    return all(w.done_on == "input" and not w.batch_event for w in wirings)


def build(cfg: Any, index: int, *args: Any, **kwargs: Any) -> Any:
    """Stage `index` of the run's method: `get(cfg.mode)(cfg, index, ...)`."""
    return get(cfg.mode)(cfg, index, *args, **kwargs)
