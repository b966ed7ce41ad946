"""When a stage cannot go on: its code raised, or it produced values that are not finite.

Retrying cannot fix either, so both runners end the run at once with one line naming the stage,
the iteration, the unit and the cause, and what to do (a StageFailure): the in-process runner
raises it; a worker sends it to the driver as a FAIL message (zdni/protocol.py), and the driver
ends the run with it. What a retry can fix (a lost message, a dead process) is retried
elsewhere; a StageError (a gradient whose slot was overwritten) is dropped and replayed as
before.

`guard` turns an exception escaping a stage's event into a StageFailure; `check` looks at what
an event produced (activation, input gradient, losses) before it is sent on. The unit that
raised, or first produced a non-finite value, is found by zdni.rng.UnitStreams.forward, which
runs a stage unit by unit.
"""

from __future__ import annotations

import contextlib
import math
import traceback
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from zdni.errors import ZdniError
from zdni.finite import finite

__all__ = ["NonFiniteError", "StageFailure", "UnitError", "check", "describe", "guard", "text"]

RAISED = "retrying cannot help: fix the model's code, or cut elsewhere (--cuts)"
NONFINITE = ("retrying cannot help: look for a log, sqrt or division of zero or an overflow "
             "there, or lower --lr")
MAX_TEXT = 480  # a FAIL message's line; longer texts are cut


class StageFailure(ZdniError, RuntimeError):
    """A stage's code raised, or it produced non-finite values: the run ends with this line."""


class UnitError(Exception):
    """Unit `unit` of the model (index in the whole model) raised inside a stage's forward."""

    def __init__(self, unit: int, module: nn.Module, exc: BaseException) -> None:
        super().__init__(f"unit {unit} ({describe(module)}): {one_line(exc)}")
        self.unit, self.module, self.exc = unit, module, exc


class NonFiniteError(Exception):
    """Unit `unit` produced non-finite activations (`child`: its innermost part that did)."""

    def __init__(self, unit: int, module: nn.Module, values: torch.Tensor,
                 child: str | None = None) -> None:
        where = f"unit {unit} ({describe(module)}{f', in its {child}' if child else ''})"
        super().__init__(f"non-finite activations ({kinds(values)}) in {where}")
        self.unit, self.where = unit, where


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:240]}" if text else type(exc).__name__


def describe(module: nn.Module) -> str:
    """A unit as a reader knows it: its class, and a Sequential's children's classes."""
    name = type(module).__name__
    if isinstance(module, nn.Sequential):
        inner = ", ".join(type(m).__name__ for m in module)
        return f"{name}({inner[:120]})"
    return name


def kinds(values: torch.Tensor) -> str:
    """Which non-finite values a tensor holds: 'nan', 'inf', '-inf'."""
    found = []
    if bool(torch.isnan(values).any()):
        found.append("nan")
    if bool(torch.isposinf(values).any()):
        found.append("inf")
    if bool(torch.isneginf(values).any()):
        found.append("-inf")
    return ", ".join(found) or "none"


def locate(module: nn.Module, h: torch.Tensor) -> str | None:
    """The innermost child of `module` (a unit) whose output on `h` is first non-finite."""
    if not isinstance(module, nn.Sequential):
        return None
    try:
        for j, child in enumerate(module):
            h = child(h)
            if isinstance(h, torch.Tensor) and not finite(h):
                return f"child {j}, {describe(child)}"
    except Exception:  # a second run is only a diagnosis: the unit is named either way
        return None
    return None


def _in_backward(exc: BaseException) -> bool:
    """Whether the exception came out of autograd's backward pass."""
    return any(f.name in ("backward", "_engine_run_backward") and "torch" in f.filename
               for f in traceback.extract_tb(exc.__traceback__))


def when(it: int, event: str) -> str:
    """'at iteration 7', 'evaluating (batch 2)', or, for the plan's probe (zdni/probe.py),
    'on a training batch of N samples before the run started' (`it` is then N)."""
    if event == "eval":
        return f"evaluating (batch {it})"
    if event == "plan":
        return f"on a training batch of {it} sample{'s' if it != 1 else ''} before the run " \
            "started"
    return f"at iteration {it}"


def _units(span: tuple[int, int]) -> str:
    return f"units {span[0]}..{span[1] - 1}" if span[1] - span[0] > 1 else f"unit {span[0]}"


@contextlib.contextmanager
def guard(stage: int, span: tuple[int, int], it: int, event: str) -> Iterator[None]:
    """Turn an exception escaping stage `stage`'s event (units span[0]..span[1]-1) into a
    StageFailure that says where and what to do. What a retry can fix passes through: a
    StageError (an unmatched or overwritten partner) and zdni's own errors."""
    import redis
    import zmq

    from zdni.protocol import MessageError
    from zdni.synthesizer import StageError

    try:
        yield
    except (StageFailure, StageError, MessageError, ZdniError, redis.RedisError, OSError,
            zmq.ZMQError):
        raise  # not the model's: a partner missing, Redis or the network away (retried)
    except NonFiniteError as exc:
        raise StageFailure(f"stage {stage} produced {exc} {when(it, event)}; {NONFINITE}"
                           ) from None
    except UnitError as exc:
        raise StageFailure(f"stage {stage} failed {when(it, event)} in {exc}; {RAISED}"
                           ) from None
    except Exception as exc:
        part = f"in the backward pass of {_units(span)}" if _in_backward(exc) else \
            f"in {_units(span)} ({event})"
        raise StageFailure(f"stage {stage} failed {when(it, event)} {part}: {one_line(exc)}; "
                           f"{RAISED}") from None


def check(stage: int, span: tuple[int, int], it: int, event: str, h_out: torch.Tensor | None,
          d_in: torch.Tensor | None, metrics: dict[str, Any]) -> None:
    """Raise a StageFailure if what an event produced holds a non-finite value: the gradient
    for the stage's input (its backward), its loss, or a synthesizer's loss. (Activations are
    checked, with their unit, as the stage computes them: zdni.rng.)"""
    units, at = _units(span), when(it, event)
    if h_out is not None and not finite(h_out):
        raise StageFailure(f"stage {stage} produced non-finite activations ({kinds(h_out)}) "
                           f"{at} ({units}); {NONFINITE}")
    if d_in is not None and not finite(d_in):
        raise StageFailure(f"stage {stage}'s backward produced non-finite gradients "
                           f"({kinds(d_in)}) {at} ({units}); {NONFINITE}")
    for name, value in metrics.items():
        if not name.endswith("loss") or not isinstance(value, float) or math.isfinite(value):
            continue
        if "grad_loss" in name or "input_loss" in name:
            which = "gradient synthesizer M" if "grad" in name else "input synthesizer I"
            raise StageFailure(f"stage {stage}'s {which} diverged ({name} {value}) {at}; "
                               f"retrying cannot help: lower --synth-lr")
        raise StageFailure(f"stage {stage}'s loss is {value} {at} ({units}); {NONFINITE}")


def text(line: Any) -> str:
    """A failure line received from the network, made safe to print: printable, one line,
    at most MAX_TEXT characters."""
    clean = "".join(c if c.isprintable() else " " for c in str(line))
    return " ".join(clean.split())[:MAX_TEXT]
