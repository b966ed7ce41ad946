"""Every Redis key name zdni uses, built in one place (the README's key table mirrors this file).

All keys of a run live under ``zdni:run:<run>:`` so ``redis-cli --scan --pattern 'zdni:run:R:*'``
shows one run and ``DEL`` of that pattern removes it.
"""

from __future__ import annotations

PREFIX = "zdni"


def runs() -> str:
    """Sorted set of run ids, scored by start time (unix seconds)."""
    return f"{PREFIX}:runs"


def current_run() -> str:
    """String: the id of the run the driver started last; workers without --run follow it."""
    return f"{PREFIX}:current"


def run_prefix(run: str) -> str:
    return f"{PREFIX}:run:{run}"


def config(run: str) -> str:
    """String: the run's RunConfig as JSON, published by the driver."""
    return f"{run_prefix(run)}:config"


def state(run: str) -> str:
    """Hash: the run's progress (status, epoch, iteration, fed, completed, accuracy)."""
    return f"{run_prefix(run)}:state"


def slot(run: str, stage: int, ring: str, index: int) -> str:
    """String: slot `index` of a stage's iteration % N ring `ring` ('out' or 'in'), as
    zdni.codec.encode_slot writes it (its iteration, then the tensors' bytes)."""
    return f"{run_prefix(run)}:buf:{stage}:{ring}:{index}"


def slot_pattern(run: str, stage: int | str = "*") -> str:
    return f"{run_prefix(run)}:buf:{stage}:*"


def driver_beat(run: str) -> str:
    """String, expiring: the driver's heartbeat; a run whose driver stopped beating is
    abandoned, and hand-started workers leave it for the next run."""
    return f"{run_prefix(run)}:hb:driver"


def heartbeat(run: str, stage: int) -> str:
    """Hash with an expiry: a stage worker's latest beat (time, iteration, utilization)."""
    return f"{run_prefix(run)}:hb:{stage}"


def health(run: str) -> str:
    """Hash: stage -> alive | failed | restarting, written by the broker's monitor."""
    return f"{run_prefix(run)}:health"


def events(run: str) -> str:
    """Pub/sub channel: health changes and other notable events, as JSON."""
    return f"{run_prefix(run)}:events"


def event_log(run: str) -> str:
    """Stream: the events published on `events(run)`, as JSON (field `json`), capped near 1,000."""
    return f"{run_prefix(run)}:eventlog"


def counters(run: str, who: str) -> str:
    """Hash: message and drop counters of one process ('broker', 'driver', 'stage:2')."""
    return f"{run_prefix(run)}:counts:{who}"


def metrics(run: str) -> str:
    """Stream: metric records (capped), one entry per record."""
    return f"{run_prefix(run)}:metrics"


def checkpoint(run: str, stage: int, iteration: int) -> str:
    """Hash: a backup of one stage at one iteration (module, synthesizers, optimizers)."""
    return f"{run_prefix(run)}:ckpt:{stage}:{iteration}"


def checkpoints(run: str, stage: int) -> str:
    """Sorted set: the iterations at which the stage has a backup, scored by iteration."""
    return f"{run_prefix(run)}:ckpts:{stage}"


def text(value: object) -> str:
    """A Redis reply as str (replies are bytes: clients do not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)
