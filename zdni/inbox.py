"""A worker's inbox: checks each arriving tensor against the stage and joins the parts of an iteration.

What travels where is the method's (zdni/stage.py: batch_parts, labels_ride, wiring): in
backprop and sg the driver sends one BATCH (x, y) to stage 1 only and each activation carries the
labels on with it (h, y), so a later stage needs one message per iteration. In full mode every
later stage needs x for I(x) at once, before its activation, so the driver sends each stage its
BATCH and activations carry h alone. A stage may then need several messages for one iteration;
they arrive in any order. The inbox keeps the parts until an event can run and hands back events
in the order they may run. It is pure: no sockets, no Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zdni import methods
from zdni.config import RunConfig
from zdni.models import NUM_CLASSES
from zdni.protocol import MessageError

MAX_BATCH = 65536  # samples per message; a larger batch is refused as hostile


def check_tensor(name: str, t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                 batch: int | None = None) -> torch.Tensor:
    """Return t if it is (B, *shape) of `dtype` with 1 <= B <= MAX_BATCH, else raise MessageError."""
    if t is None:
        raise MessageError("missing", f"expected tensor {name!r}, it is missing")
    if t.dtype != dtype:
        raise MessageError("dtype", f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.dim() != 1 + len(shape) or tuple(t.shape[1:]) != tuple(shape):
        raise MessageError("shape", f"{name}: expected shape (B, {', '.join(map(str, shape))}),"
                                  f" got {tuple(t.shape)}")
    if not 1 <= t.shape[0] <= MAX_BATCH or (batch is not None and t.shape[0] != batch):
        want = batch if batch is not None else f"1..{MAX_BATCH}"
        raise MessageError("shape", f"{name}: expected batch {want}, got {t.shape[0]}")
    return t


def check_labels(y: torch.Tensor | None, batch: int | None = None,
                 classes: int = NUM_CLASSES, shape: tuple[int, ...] = ()) -> torch.Tensor:
    """Labels: int64 (B, *shape) within 0..classes-1 (shape: the run's per-sample labels)."""
    y = check_tensor("y", y, shape, torch.int64, batch)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise MessageError("value", f"y: labels must be within 0..{classes - 1}")
    return y


@dataclass
class Parts:
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    h: torch.Tensor | None = None
    batch_done: bool = False  # the batch event (full mode's synthetic pass) was handed out


@dataclass
class Inbox:
    """Joins batch and activation messages per iteration for one stage."""

    cfg: RunConfig
    index: int
    count: int
    limit: int = 1024  # iterations held at once; more means a flood, and the oldest are dropped
    parts: dict[int, Parts] = field(default_factory=dict)

    def __post_init__(self) -> None:
        method = methods.get(self.cfg.mode)
        self.needs_x, self.needs_y = method.batch_parts(self.cfg, self.index, self.count)
        self.takes_batch = self.needs_x or self.needs_y
        # Labels that come with the activation (h, y): every later stage outside full mode.
        self.act_labels = method.labels_ride(self.cfg) and self.index > 1
        # The batch is an event of its own before the input (full mode's synthetic pass).
        self.batch_event = method.wiring(self.index, self.count).batch_event

    def add_batch(self, it: int, x: torch.Tensor | None, y: torch.Tensor | None) -> list[str]:
        """Record the driver's batch; returns the events now ready ('batch', 'input').

        The first message of each part wins: a second batch of a held iteration, or one whose
        size disagrees with the activation already held, raises MessageError and changes nothing,
        so a forged or repeated message cannot evict the parts that came first.
        """
        if not self.takes_batch:
            raise MessageError("kind", f"stage {self.index} takes no batch in mode {self.cfg.mode}:"
                                     " its labels come with the activation")
        x = x if self.needs_x else None
        y = y if self.needs_y else None
        held = self.parts.get(it)
        if held is not None:
            if held.x is not None or held.y is not None:
                raise MessageError("duplicate", f"iteration {it}: its batch is already held")
            new = x if x is not None else y
            self._agree(it, "batch", new, held.h)
        p = self._parts(it)
        p.x, p.y = x, y
        return self._ready(it)

    def add_act(self, it: int, h: torch.Tensor, y: torch.Tensor | None = None) -> list[str]:
        """Record the true input from upstream, with its labels when they ride with it (checked
        by the caller to match h); returns the events now ready (the first activation wins)."""
        if self.act_labels and y is None:
            raise MessageError("missing", f"stage {self.index}: an activation must carry its labels y")
        held = self.parts.get(it)
        if held is not None:
            if held.h is not None:
                raise MessageError("duplicate", f"iteration {it}: its activation is already held")
            self._agree(it, "activation", h, held.x if held.x is not None else held.y)
        p = self._parts(it)
        p.h = h
        if self.act_labels:
            p.y = y
        return self._ready(it)

    @staticmethod
    def _agree(it: int, what: str, new: torch.Tensor | None, held: torch.Tensor | None) -> None:
        if new is not None and held is not None and new.shape[0] != held.shape[0]:
            raise MessageError("shape", f"iteration {it}: the {what} has {new.shape[0]} samples,"
                                      f" the parts already held have {held.shape[0]}")

    def take(self, it: int) -> Parts:
        """The parts of a finished iteration, forgotten here."""
        return self.parts.pop(it)

    def peek(self, it: int) -> Parts:
        return self.parts[it]

    def _parts(self, it: int) -> Parts:
        if it not in self.parts and len(self.parts) >= self.limit:
            self.parts.pop(min(self.parts))
        return self.parts.setdefault(it, Parts())

    def _ready(self, it: int) -> list[str]:
        p = self.parts[it]
        if self.takes_batch:
            have_batch = (p.x is not None or not self.needs_x) and (
                p.y is not None or not self.needs_y) and (p.x is not None or p.y is not None)
        else:
            have_batch = True
        events = []
        if self.batch_event and have_batch and not p.batch_done:
            p.batch_done = True
            events.append("batch")
        true_input = p.x if self.index == 1 else p.h
        if true_input is not None and have_batch and (p.batch_done or not self.batch_event):
            events.append("input")
        return events
